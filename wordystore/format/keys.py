"""The store's names and limits: its key names, the names a kind or token set may take, the limits
on what a document may claim, and the rules on vocabularies, token sets and the config (docs/format.md)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

import numpy as np

from wordystore.format.kinds import Kind

FORMAT_NAME = "wordystore.trajectory"
FORMAT_VERSION = 4  # what this wordystore writes
READ_VERSIONS = (2, 3, 4)  # what it reads; formats 2 and 3 differ as the functions taking ``version`` say
ATTRS_KEY = "wordystore"  # root group attribute holding the metadata document

# -- limits: what a document may claim, checked before anything is allocated or enumerated --------------

MAX_ROWS = 2**40  # rows (recorded steps) of a store
MAX_ROW_BYTES = 2**38  # bytes of one row of one kind (256 GiB)
MAX_CHUNK_ROWS = 2**12  # rows per main chunk
MAX_DOCUMENT_BYTES = 2**26  # a JSON document (64 MiB)
MAX_STATE_BYTES = 2**36  # a resume state's safetensors file (64 GiB)
MAX_NAME_LENGTH = 128  # a kind's or token set's name: one path component

# -- keys (docs/format.md, "Keys") -------------------------------------------------------------------

ZARR_JSON = "zarr.json"  # a group's or an array's document; the root's holds the metadata
COMMIT_KEY = "commit.json"  # the commit record, a JSON document at the store's root
VERIFIED_KEY = "verified.json"  # the outcome of the last `wordystore verify`
STEPS_ARRAY = "recorded_steps"  # int64 [row]: the training step each row holds
TOKEN_SETS_GROUP = "token_sets"
HOT_GROUP = "hot"
STATE_PREFIX = "state"  # resume states: state/<row>.safetensors (wordystore.store.resume_state)
ANALYSIS_PREFIX = "analysis"  # cached analysis results: analysis/<name>-<digest>.json
WRITER_LOCK_KEY = ".wordystore-writer.lock"  # a directory's flock file; an object store's lease (LeaseRecord)
CHUNK_DIR = "c"  # chunk key encoding "default" with "/": <array>/c/<i>/<j>/...
RESERVED_NAMES = frozenset(
    {STEPS_ARRAY, TOKEN_SETS_GROUP, COMMIT_KEY, ZARR_JSON, ANALYSIS_PREFIX, HOT_GROUP, STATE_PREFIX, VERIFIED_KEY}
)  # the store root's keys: no kind may take them
NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")  # a kind's or token set's name: one path component
RESIDUALS_SUFFIX = ".residuals"  # format 3: the main array of a predicted kind is <kind>.residuals
GROUP_JSON = {"zarr_format": 3, "node_type": "group", "attributes": {}}  # a plain group's zarr.json
TIERS = ("main", "hot")
STEPS_KIND = Kind((), "int64", ())
STATE_KEY = re.compile(rf"^{STATE_PREFIX}/\d{{12,20}}\.safetensors$")  # state/<row, 12 digits>.safetensors
# A local store writes each key as a temporary file renamed into place (zarr's LocalStore: the key with
# its suffix replaced by .<uuid4 hex>.partial); a writer killed meanwhile leaves it behind.
TEMPORARY_KEY = re.compile(r"\.[0-9a-f]{32}\.partial$")


def versions_text() -> str:
    """The format versions this wordystore reads, as a message says them: ``2, 3 and 4``."""
    *first, last = map(str, READ_VERSIONS)
    return f"{', '.join(first)} and {last}" if first else last


def document_key(path: str) -> str:
    """The key of the ``zarr.json`` of the group or array at ``path`` (``""``: the root)."""
    return f"{path}/{ZARR_JSON}" if path else ZARR_JSON


def array_path(name: str, tier: str = "main", predicted: bool = False, version: int = FORMAT_VERSION) -> str:
    """Where array ``name`` (a kind or ``recorded_steps``) of ``tier`` lives: ``name`` or ``hot/name``;
    a predicted kind's main array, whose values are residuals, is ``name.residuals`` (format 2: ``name``)."""
    if tier == "hot":
        return f"{HOT_GROUP}/{name}"
    return f"{name}{RESIDUALS_SUFFIX}" if predicted and version >= 3 else name


def token_set_path(name: str) -> str:
    return f"{TOKEN_SETS_GROUP}/{name}"


def is_chunk_key(key: str) -> bool:
    """Whether ``key`` holds chunk bytes (a shard) rather than a document."""
    return f"/{CHUNK_DIR}/" in key


def state_key(row: int) -> str:
    """Where the resume state kept with row ``row`` lives."""
    return f"{STATE_PREFIX}/{row:012d}.safetensors"


def is_state_key(key) -> bool:
    return isinstance(key, str) and STATE_KEY.match(key) is not None


def is_temporary_key(key: str) -> bool:
    """Whether ``key`` is a temporary file a killed writer left (:data:`TEMPORARY_KEY`)."""
    return TEMPORARY_KEY.search(key) is not None


def check_kind_name(name: str, what: str = "kind") -> str:
    """A kind's or token set's name: one path component of letters, digits, ``_.-`` (starting with
    a letter or ``_``), none of the root's keys, not ending in ``.residuals``."""
    if (
        not isinstance(name, str)
        or not NAME_PATTERN.match(name)
        or name in RESERVED_NAMES
        or len(name) > MAX_NAME_LENGTH
        or name.endswith(RESIDUALS_SUFFIX)
    ):
        raise ValueError(
            f"{what} name {name!r} is not allowed: use up to {MAX_NAME_LENGTH} letters, digits, '_', '.', '-' "
            f"(starting with a letter or '_'), not ending in '{RESIDUALS_SUFFIX}', and none of {sorted(RESERVED_NAMES)}"
        )
    return name


# -- what the kinds imply -----------------------------------------------------------------------------


def vocab_size(kinds: Mapping[str, Kind]) -> int | None:
    """Length of the ``token`` axis shared by the kinds that have one (None if none has);
    ValueError if they disagree."""
    lengths = {k.shape[k.dims.index("token")] for k in kinds.values() if "token" in k.dims}
    if len(lengths) > 1:
        raise ValueError(f"kinds disagree on the length of the token axis: {sorted(lengths)}")
    return lengths.pop() if lengths else None


def is_token_set(ids: np.ndarray, vocab: int | None) -> bool:
    """A token set is sorted, unique ids in ``[0, vocab)`` (any non-negative id without a token axis)."""
    return token_set_problem(ids, vocab) is None


def token_set_problem(ids: np.ndarray, vocab: int | None) -> str | None:
    """Why ``ids`` are no token set (:func:`is_token_set`), naming the first bad id; None if they are one."""
    ids = np.asarray(ids)
    if not ids.size:
        return None
    bad = (ids < 0) | (ids >= vocab if vocab is not None else False)
    bad[1:] |= np.diff(ids) <= 0
    if not bad.any():
        return None
    i = int(np.argmax(bad))
    value = int(ids[i])
    if value < 0:
        why = "is negative"
    elif vocab is not None and value >= vocab:
        why = f"is past the vocabulary of {vocab} tokens"
    elif value == ids[i - 1]:
        why = "repeats the id before it"
    else:
        why = f"comes after {int(ids[i - 1])}, out of order"
    bound = "any" if vocab is None else vocab
    return f"id {value} at position {i} {why}; a token set holds sorted, unique ids in [0, {bound})"


def check_config(config) -> None:
    """The run's config is stored as JSON, without NaN."""
    try:
        json.dumps(config, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"config must be JSON-serialisable (no NaN): {exc}") from None
