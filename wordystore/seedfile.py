"""The seed notebook's single-safetensors layout: streaming export to it and import from it.

Layout ("Save Recorded Data" in the notebook): ``recorded_steps`` int64 [S]; ``embeddings``,
``grads``, ``momentum``, ``variance`` bfloat16 [S, V, D]; ``logits`` bfloat16 [S, V]; ``losses``
bfloat16 [S]; 0-dim float32 ``init_scale``, ``learning_rate``, ``weight_decay``, ``adam_beta1``,
``adam_beta2``; 0-dim int64 ``n_trained``, ``n_untrained``.

Export writes the safetensors file itself, tensor by tensor and a few steps at a time, so memory
stays bounded whatever the trajectory's length; it writes to a temporary name and renames at the end.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from wordystore import format, trajectory
from wordystore.indexing import step_rows
from wordystore.kinds import Kind
from wordystore.lifecycle import create_whole
from wordystore.tokensets import token_sets_from_mask_file
from wordystore.trajectory import Trajectory
from wordystore.version import __version__

STEP_KINDS = ("embeddings", "grads", "momentum", "variance", "logits", "losses")
FLOAT_SCALARS = ("init_scale", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2")
COUNT_SCALARS = ("n_trained", "n_untrained")
ST_DTYPES = {"bfloat16": "BF16", "float32": "F32", "int64": "I64", "float16": "F16", "float64": "F64",
             "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled)


def seed_scalars(t: Trajectory) -> dict[str, float | int]:
    """The notebook's scalars for ``t``: kept from an import, else from the trainer's run config."""
    if "seed_scalars" in t.config:
        return dict(t.config["seed_scalars"])
    params = t.config.get("run")  # the trainer's parameters
    if params is None:
        raise ValueError("the trajectory has neither 'seed_scalars' nor a trainer 'run' config to export scalars from")
    sets = t.metadata["token_sets"]
    if "trained" not in sets or "untrained" not in sets:
        raise ValueError(f"export needs token sets 'trained' and 'untrained'; the trajectory has {sets}")
    scalars = {name: params[name] for name in FLOAT_SCALARS}
    scalars.update(n_trained=len(t.token_set("trained")), n_untrained=len(t.token_set("untrained")))
    return scalars


def export(store, out, *, rows=None, steps=None, tokens=None, kinds=None, overwrite=False, progress=True,
           threads: int | None = None) -> Path:
    """Write the trajectory at ``store`` to ``out`` in the notebook's layout.

    ``steps`` selects training steps as ``.loc`` does (``slice(100, 200)``: steps 100..200
    inclusive; an int; a list), ``rows`` selects rows positionally (``slice(0, 101)``); give one
    or neither (everything). ``tokens`` is a token subset (a token-set name or ids), ``kinds``
    some of the per-step kinds only. Returns the path written. Each kind is read a tile at a
    time (a chunk of rows by a shard of tokens) on ``threads`` threads (default: every core) and
    written in place, so memory stays at a few tiles whatever the size.

    >>> export("runs/wb1b.zarr", "last.safetensors", steps=slice(190, None), tokens="untrained")
    """
    t = trajectory.open(store, cache_bytes=0)
    out = Path(out)
    _check_output(out, overwrite)
    kinds = list(STEP_KINDS if kinds is None else kinds)
    unknown = [k for k in kinds if k not in t.kinds]
    if unknown:
        raise ValueError(f"kinds {unknown} are not in the trajectory; it has {list(t.kinds)}")
    rows = _selected_rows(t, rows, steps)
    token_ids = _token_ids(t, tokens)

    plan = {"recorded_steps": ("int64", (len(rows),), t.steps[rows].astype("<i8"))}
    for name in kinds:
        kind = t.kinds[name]
        shape = list(kind.shape)
        if token_ids is not None and "token" in kind.dims:
            shape[kind.dims.index("token")] = len(token_ids)
        plan[name] = (kind.dtype, (len(rows), *shape), kind)
    scalars = seed_scalars(t)
    for name in FLOAT_SCALARS:
        plan[name] = ("float32", (), np.float32(scalars[name]))
    for name in COUNT_SCALARS:
        plan[name] = ("int64", (), np.int64(scalars[name]))

    header, offset = {}, 0
    for name, (dtype, shape, _) in plan.items():
        size = int(np.prod(shape, dtype=np.int64)) * Kind((), dtype).numpy_dtype.itemsize
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt", "exported_by": f"wordystore {__version__}"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    data_start = 8 + len(blob)

    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        with _naming(out, tmp):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.ftruncate(fd, data_start + offset)
                os.pwrite(fd, struct.pack("<Q", len(blob)) + blob, 0)
                buffers = threading.local()  # one tile buffer per thread, reused
                with _progress(offset, f"export {out.name}", progress) as bar, \
                        ThreadPoolExecutor(threads or os.cpu_count()) as pool:
                    for name, (dtype, shape, source) in plan.items():
                        base = data_start + header[name]["data_offsets"][0]
                        if not isinstance(source, Kind):
                            os.pwrite(fd, np.asarray(source).tobytes(), base)
                            continue
                        tiles = _tiles(t, name, source, rows, token_ids)
                        for nbytes in pool.map(lambda tile: _export_tile(fd, base, shape, t, name, tile, buffers), tiles):
                            bar.update(nbytes)
            finally:
                os.close(fd)
            os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _tiles(t: Trajectory, name: str, kind: Kind, rows: np.ndarray, token_ids) -> list[tuple]:
    """(output row offset, row indices, output token offset, token index) for every tile of a
    kind: a main chunk's worth of rows by a shard's worth of tokens."""
    main = t.layouts[name][0]
    row_block = main.chunk[0]
    if not kind.shape:
        return [(r, rows[r : r + row_block], None, None) for r in range(0, len(rows), row_block)]
    width, n = main.shard[1], kind.shape[0]
    tokens = np.arange(n) if token_ids is None or "token" not in kind.dims else np.asarray(token_ids)
    return [(r, rows[r : r + row_block], a, tokens[a : a + width])
            for r in range(0, len(rows), row_block) for a in range(0, len(tokens), width)]


def _export_tile(fd: int, base: int, shape: tuple[int, ...], t: Trajectory, name: str, tile: tuple,
                 buffers: threading.local) -> int:
    """Read one tile and write each of its rows where the exported tensor (of ``shape``, steps
    first) keeps them; returns the bytes written. Contiguous tiles decode into a buffer each
    thread reuses (fresh memory costs page faults on every tile)."""
    row0, rows, token0, tokens = tile
    if len(rows) == 0 or (tokens is not None and len(tokens) == 0):
        return 0
    kind = t.kinds[name]
    contiguous = np.all(np.diff(rows) == 1) and (tokens is None or np.all(np.diff(tokens) == 1))
    if contiguous:
        tile_shape = (len(rows), *(() if tokens is None else (len(tokens), *kind.shape[1:])))
        data = getattr(buffers, "data", None)
        if data is None or data.nbytes < np.prod(tile_shape) * kind.numpy_dtype.itemsize:
            data = buffers.data = np.empty(int(np.prod((len(rows), *kind.shape))), kind.numpy_dtype)
        data = data[: int(np.prod(tile_shape))].reshape(tile_shape)
        fetch = [slice(int(rows[0]), int(rows[-1]) + 1, 1)]
        if tokens is not None:
            fetch.append(slice(int(tokens[0]), int(tokens[-1]) + 1, 1))
        t.read_into(name, tuple(fetch) + tuple(slice(0, n, 1) for n in tile_shape[len(fetch):]), data)
    else:
        data = t[name].numpy((rows,) if tokens is None else (rows, tokens), orthogonal=True)
    step_bytes = data[0].nbytes if tokens is None else data[0].nbytes // len(tokens) * shape[1]
    token_bytes = 0 if tokens is None else data[0].nbytes // len(tokens)
    for i in range(len(rows)):
        os.pwrite(fd, data[i], base + (row0 + i) * step_bytes + (token0 or 0) * token_bytes)
    return data.nbytes


def import_seed_file(path, store, *, token_masks=None, overwrite=False, progress=True) -> Trajectory:
    """Convert a notebook-layout safetensors file into a trajectory.

    Tiles of rows are read from the file with plain reads straight into encode buffers (no memory
    map, so the file's pages never count against the process) and encoded on every core.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        f = safe_open(str(path), framework="np")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file: {exc}") from None
    with f:
        names = set(f.keys())
        required = {"recorded_steps", *STEP_KINDS, *FLOAT_SCALARS, *COUNT_SCALARS}
        if required - names:
            raise ValueError(f"{path} lacks the notebook's tensors {sorted(required - names)}")
        steps = f.get_tensor("recorded_steps")
        S = len(steps)
        emb_shape = f.get_slice("embeddings").get_shape()
        if len(emb_shape) != 3 or emb_shape[0] != S:
            raise ValueError(f"{path}: embeddings has shape {emb_shape}; expected [{S}, vocab, dim]")
        _, V, D = emb_shape
        expected = {"embeddings": [S, V, D], "grads": [S, V, D], "momentum": [S, V, D], "variance": [S, V, D],
                    "logits": [S, V], "losses": [S]}
        kinds = {}
        for name, shape in expected.items():
            sl = f.get_slice(name)
            if sl.get_shape() != shape or sl.get_dtype() != "BF16":
                raise ValueError(f"{path}: {name} is {sl.get_dtype()} {sl.get_shape()}; expected BF16 {shape}")
            dims = ("token", "dim")[: len(shape) - 1]
            kinds[name] = Kind(tuple(shape[1:]), "bfloat16", dims)
        scalars = {n: float(f.get_tensor(n)) for n in FLOAT_SCALARS}
        scalars.update({n: int(f.get_tensor(n)) for n in COUNT_SCALARS})
    header, data_start = _read_header(path)
    sets = None
    if token_masks is not None:
        sets = token_sets_from_mask_file(token_masks, V)
    config = {"seed_scalars": scalars, "imported_from": str(path.resolve())}
    fd = os.open(path, os.O_RDONLY)
    try:
        def read_tile(name: str, fetch: tuple, out: np.ndarray) -> None:
            """Rows ``fetch[0]`` and a range of the first per-step axis (later axes whole) of ``name``."""
            base = data_start + header[name]["data_offsets"][0]
            step_bytes = out[0].nbytes if out.ndim == 1 else out[0].nbytes // out.shape[1] * kinds[name].shape[0]
            skip = 0 if out.ndim == 1 else fetch[1].start * (out[0].nbytes // out.shape[1])
            for i, row in enumerate(range(fetch[0].start, fetch[0].stop)):
                target = memoryview(out[i : i + 1].reshape(-1).view(np.uint8))
                if os.preadv(fd, [target], base + row * step_bytes + skip) != len(target):
                    raise ValueError(f"{path} is truncated: {name} row {row} is incomplete")

        with create_whole(store, kinds, token_sets=sets, config=config, overwrite=overwrite) as w, \
                _progress(S, f"import {path.name}", progress) as bar:
            w.bulk_append(steps, read_tile, progress=bar.update)
    finally:
        os.close(fd)
    return trajectory.open(store)


def _read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's JSON header and where its data starts."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length)), 8 + length


def _check_output(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a directory; expected the path of a .safetensors file to write")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"cannot write {out}: directory {out.parent} does not exist")


def _selected_rows(t: Trajectory, rows, steps) -> np.ndarray:
    """Row numbers to export, from a positional ``rows`` or a ``.loc``-style ``steps`` selection."""
    if rows is not None and steps is not None:
        raise ValueError("give rows or steps, not both")
    if steps is not None:
        selected = np.arange(len(t))[step_rows(t.steps, steps)]
    else:
        try:
            selected = np.arange(len(t))[slice(None) if rows is None else rows]
        except IndexError:
            raise IndexError(f"rows {_text(rows)} are out of range; the trajectory has {len(t)} rows") from None
    selected = np.atleast_1d(selected)
    if selected.size == 0:
        what = f"steps {_text(steps)}" if steps is not None else f"rows {_text(rows)}"
        recorded = f"{t.steps[0]}..{t.steps[-1]}" if len(t) else "none"
        raise ValueError(f"{what} select nothing; the trajectory has {len(t)} rows, training steps {recorded}")
    return selected


def _text(selection) -> str:
    if isinstance(selection, slice):
        return ":".join("" if v is None else str(v) for v in (selection.start, selection.stop, selection.step)).rstrip(":")
    return str(selection)


def _token_ids(t: Trajectory, tokens) -> np.ndarray | None:
    """``tokens`` (a token-set name, or token ids) as ids checked against the token axis."""
    if tokens is None or isinstance(tokens, str):
        return None if tokens is None else t.token_set(tokens)
    ids = np.asarray(tokens)
    if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
        raise ValueError(f"tokens must be a token-set name or a non-empty list of token ids, got {tokens!r}")
    vocab = format.vocab_size(t.kinds)
    bad = ids[(ids < 0) | (ids >= vocab)] if vocab is not None else ids[:0]
    if bad.size:
        raise ValueError(f"token ids {bad[:5].tolist()} are outside the vocabulary; expected ids in [0, {vocab})")
    return ids.astype(np.int64)


@contextlib.contextmanager
def _naming(out: Path, tmp: Path):
    """Name ``out`` in an OS error (ENOSPC, EIO...) while writing it, not the temporary file."""
    try:
        yield
    except OSError as exc:
        if exc.filename not in (None, str(tmp)):
            raise  # about another file (a store's chunk): its own name says it
        raise OSError(exc.errno, f"cannot write {out}: {exc.strerror or exc}") from exc
