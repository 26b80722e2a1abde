"""The resume-state record: a run's full state kept with a commit, so that it can go on bit for bit.

A state is one safetensors file at ``state/<row, 12 digits>.safetensors``: the tensors a state
provider gave (parameters, optimizer moments, RNGs) and, in the safetensors header's
``__metadata__``, ``{"info": <JSON text>, "row": "<row>", "step": "<step>"}``: the row the state
follows and that row's training step. The commit record names the states it keeps in ``states``,
as ``{"row", "step", "key", "crc32c", "nbytes"}`` entries, oldest first (format 2's carry no
``crc32c`` and ``nbytes``); a state is usable only if the record names it, the file has the size
and CRC-32C the entry records, its header agrees with the entry and the row holds that step. The
writer stores a state in the same commit as its row (:class:`ResumeState`), ``wordystore verify``
checks each (:func:`entry_problem`, :func:`file_problem`), and :func:`load_state` reads the newest
back, checking the same.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

import crc32c
import numpy as np
import torch

from wordystore.errors import FormatError
from wordystore.format.keys import COMMIT_KEY, MAX_STATE_BYTES, STATE_PREFIX, state_key
from wordystore.store import json_documents, storage
from wordystore.store.storage import as_store, describe

KEY_PREFIX = f"{STATE_PREFIX}/"


def read_header(data: bytes) -> dict:
    """The ``__metadata__`` of a state file's safetensors header (a u64 length, then JSON)."""
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length])["__metadata__"]


def held_by(data: bytes) -> tuple[int, int]:
    """(row, step) a state file says it follows."""
    header = read_header(data)
    return int(header["row"]), int(header["step"])


@dataclass
class ResumeState:
    """A run's state after row ``row`` (training step ``step``): tensors and a JSON-serialisable dict."""

    row: int
    step: int
    tensors: dict[str, torch.Tensor]
    info: dict

    def __post_init__(self):
        json.dumps(self.info, allow_nan=False)  # the header holds it as JSON: refuse what it cannot hold, now

    @property
    def key(self) -> str:
        return state_key(self.row)

    def entry(self, data: bytes) -> dict:
        """The commit record's ``states`` entry naming this state, stored as ``data`` (:meth:`encode`)."""
        return {"row": self.row, "step": self.step, "key": self.key, "crc32c": crc32c.crc32c(data), "nbytes": len(data)}

    def encode(self) -> bytes:
        from safetensors.torch import save

        metadata = {"info": json.dumps(self.info), "row": str(self.row), "step": str(self.step)}
        return save(self.tensors, metadata=metadata)


def entry_problem(entry: dict, steps: np.ndarray, rows: int) -> str | None:
    """Why a record's ``states`` entry (well-formed: :func:`wordystore.format.records.state_entry_problem`)
    cannot name a usable state with ``rows`` committed rows, the first of which hold ``steps``
    (judged without reading the file); None if it can."""
    row, step = entry["row"], entry["step"]
    if row >= rows:
        return f"it is of row {row}, past the {rows} committed rows"
    if row < len(steps) and steps[row] != step:
        return f"it is of row {row}, step {step}, but that row holds step {steps[row]}"
    return None


def read_state(store, entry: dict) -> bytes | None:
    """The bytes of the state file ``entry`` names (None: absent), read only up to the size the
    entry records (format 2: ``MAX_STATE_BYTES``)."""
    return storage.get(store, entry["key"], limit=entry.get("nbytes", MAX_STATE_BYTES))


def file_problem(entry: dict, data: bytes | None) -> str | None:
    """Why the state file ``data`` (None: absent) is not the state ``entry`` names; None if it is."""
    from safetensors.torch import load

    if data is None:
        return "it is missing"
    if "nbytes" in entry and (len(data), crc32c.crc32c(data)) != (entry["nbytes"], entry["crc32c"]):
        return (
            f"it is {len(data)} bytes of CRC-32C {crc32c.crc32c(data):#010x}; {COMMIT_KEY} recorded "
            f"{entry['nbytes']} bytes of CRC-32C {entry['crc32c']:#010x}: the file was changed or damaged"
        )
    row, step = entry["row"], entry["step"]
    try:
        load(data)
        header = read_header(data)
        if (int(header["row"]), int(header["step"])) != (row, step):
            return f"it holds row {header['row']}, step {header['step']}; the record says row {row}, step {step}"
        json.loads(header["info"])
    except Exception as exc:  # safetensors raises its own SafetensorError
        return f"it is not a readable resume state ({type(exc).__name__}: {exc})"
    return None


def load_state(where) -> tuple[dict[str, torch.Tensor], dict, int] | None:
    """The newest resume state a writer committed with the trajectory at ``where``: ``(tensors,
    info, step)``, or None if it has none. Safe to call on any store: safetensors and JSON only,
    the file checked against its size and CRC-32C in the commit record (format 3) first.

    >>> tensors, info, step = wordystore.load_state("runs/wb1b.zarr")
    """
    from safetensors.torch import load

    store = as_store(where, read_only=True)
    record = json_documents.read_commit(store)
    if not record.states:
        return None
    newest = record.states[-1]
    repair = f"`wordystore verify {describe(store)} --repair` drops it from {COMMIT_KEY}"
    try:
        data = read_state(store, newest)
    except FormatError as exc:
        raise FormatError(f"{describe(store)}: resume state {newest['key']} cannot be read ({exc}); {repair}") from None
    if data is None:
        raise FormatError(f"{describe(store)}: resume state {newest['key']} named by {COMMIT_KEY} is missing")
    problem = file_problem(newest, data)
    if problem:
        raise FormatError(f"{describe(store)}: resume state {newest['key']} is damaged: {problem}; {repair}")
    header = read_header(data)
    return load(data), json.loads(header["info"]), int(newest["step"])
