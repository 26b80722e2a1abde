"""The seed notebook's single-safetensors layout: streaming export to it and import from it.

Layout ("Save Recorded Data" in the notebook): ``recorded_steps`` int64 [S]; ``embeddings``,
``grads``, ``momentum``, ``variance`` bfloat16 [S, V, D]; ``logits`` bfloat16 [S, V]; ``losses``
bfloat16 [S]; 0-dim float32 ``init_scale``, ``learning_rate``, ``weight_decay``, ``adam_beta1``,
``adam_beta2``; 0-dim int64 ``n_trained``, ``n_untrained``.

Export writes the safetensors file itself, tensor by tensor and a few steps at a time, so memory
stays bounded whatever the trajectory's length; it writes to a temporary name and renames at the end.

What the layout has no tensor for travels in the header's ``__metadata__`` (string values; safetensors'
own ``load_file`` still returns exactly the notebook's tensors), and import reads it back:

- ``wordystore.token_sets``: JSON ``{"name": [token positions], ...}``, positions on the file's token
  axis (the vocabulary ids, unless ``--tokens`` exported a subset);
- ``wordystore.token_ids``: JSON, the vocabulary id of each token position, when a subset was exported;
- ``wordystore.config``: JSON, the store's config (the run's parameters, TrainingArguments, data...);
- ``wordystore.tools.scalars``: JSON ``{"kind": {"dtype": "float32", "data": base64}, ...}``, every other
  0-d kind of the store (``learning_rate``, ``grad_norm``, ``grad_norm_clipped``): its value at each
  exported step, little-endian, bit for bit.

What cannot travel (other kinds, the run's resume state) is named in a :class:`RoundTripWarning`.

Import stores Adam's moments as residuals of a replayed update (:class:`AdamPrediction`), as the
trainer does, with the file's betas. A notebook file has no gradient norms to replay the clipping
from, so each step's clip coefficient is estimated from the recorded moments and gradients
(:func:`wordystore.format.prediction.estimate_clip`) and stored as the 0-d kind ``clip_coef``; the
options (estimated coefficients, the file's gradient norms when an export carried them, no
clipping, no prediction) are measured on a sample of the file and the smallest is taken
(:func:`choose_predictions`; ``config["import_prediction"]`` records the measurements).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import struct
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from wordystore.errors import RoundTripWarning
from wordystore.format.codecs import encoded_nbytes
from wordystore.format.keys import vocab_size
from wordystore.format.kinds import DTYPES, Kind
from wordystore.format.layout import CHUNK_ROWS, Profile, check_kinds
from wordystore.format.prediction import adam_predictions, estimate_clip
from wordystore.read import trajectory
from wordystore.read.indexing import step_rows
from wordystore.read.trajectory import Trajectory
from wordystore.tools.token_sets import token_sets_from_mask_file
from wordystore.version import __version__
from wordystore.write.start import create_whole

STEP_KINDS = ("embeddings", "grads", "momentum", "variance", "logits", "losses")
FLOAT_SCALARS = ("init_scale", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2")
COUNT_SCALARS = ("n_trained", "n_untrained")
ST_DTYPES = {
    "bfloat16": "BF16",
    "float32": "F32",
    "int64": "I64",
    "float16": "F16",
    "float64": "F64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


METADATA = "wordystore."  # the prefix of the header's __metadata__ keys wordystore writes
CLIP_KIND = "clip_coef"  # the 0-d kind of each step's clip coefficient, estimated by import
CLIP = Kind((), "float32", ())
SAMPLED_CHUNKS = 4  # token chunks per row an import's choice of prediction is measured on


def _progress(total: int, desc: str, enabled: bool, unit: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", disable=not enabled)


def seed_scalars(t: Trajectory) -> dict[str, float | int]:
    """The notebook's scalars for ``t``: kept from an import, else from the trainer's run config."""
    if "seed_scalars" in t.config:
        scalars = t.config["seed_scalars"]
        missing = [
            n
            for n in (*FLOAT_SCALARS, *COUNT_SCALARS)
            if not isinstance(scalars, dict)
            or isinstance(scalars.get(n), bool)
            or not isinstance(scalars.get(n), (int, float))
        ]
        if missing:
            raise ValueError(
                f"the trajectory's config['seed_scalars'] lacks numbers for {missing}; an imported store "
                f"keeps the notebook's {list(FLOAT_SCALARS + COUNT_SCALARS)}"
            )
        return dict(scalars)
    params = t.config.get("run")  # the trainer's parameters
    if params is None:
        raise ValueError("the trajectory has neither 'seed_scalars' nor a trainer 'run' config to export scalars from")
    sets = t.metadata["token_sets"]
    if "trained" not in sets or "untrained" not in sets:
        raise ValueError(f"export needs token sets 'trained' and 'untrained'; the trajectory has {sets}")
    scalars = {name: params[name] for name in FLOAT_SCALARS}
    scalars.update(n_trained=len(t.token_set("trained")), n_untrained=len(t.token_set("untrained")))
    return scalars


def export(
    store,
    out,
    *,
    rows=None,
    steps=None,
    tokens=None,
    kinds=None,
    overwrite=False,
    progress=True,
    threads: int | None = None,
) -> Path:
    """Write the trajectory at ``store`` to ``out`` as one safetensors file in the notebook's layout.

    Each kind is read a tile at a time (a chunk of rows by a shard of tokens) and written in place,
    so memory stays at a few tiles whatever the size. Token sets, the config and 0-d kinds outside
    the notebook's layout go into the header's metadata, so that :func:`import_seed_file` brings
    them back.

    Parameters
    ----------
    store : str, os.PathLike or zarr store
        The trajectory to export.
    out : str or os.PathLike
        The file to write.
    rows : int, slice or list of int, optional
        Rows by position (``slice(0, 101)``).
    steps : int, slice or list of int, optional
        Training steps, as ``.loc`` selects them (``slice(100, 200)``: steps 100..200 inclusive).
        Give ``rows`` or ``steps`` or neither (everything).
    tokens : str or list of int, optional
        A token subset: a token-set name or ids.
    kinds : list of str, optional
        Some kinds only (default: the notebook's).
    overwrite : bool
        Replace ``out`` if it exists (default: refuse).
    progress : bool
        Draw a progress bar.
    threads : int, optional
        Threads reading and encoding (default: every core).

    Returns
    -------
    pathlib.Path
        The file written.

    Examples
    --------
    >>> from wordystore.tools.safetensors_layout import export
    >>> export("runs/quick.zarr", "last.safetensors", steps=slice(2, None), tokens="untrained")
    PosixPath('last.safetensors')
    """
    t = trajectory.open(store, cache_bytes=0)
    out = Path(out)
    _check_output(out, overwrite)
    asked = [*STEP_KINDS, *(k for k in t.kinds if k not in STEP_KINDS)] if kinds is None else list(kinds)
    unknown = [k for k in asked if k not in t.kinds]
    if unknown:
        raise ValueError(f"kinds {unknown} are not in the trajectory; it has {list(t.kinds)}")
    in_metadata = [k for k in asked if k not in STEP_KINDS and t.kinds[k].shape == ()]
    kinds = [k for k in asked if k not in in_metadata and (kinds is not None or k in STEP_KINDS)]
    rows = _selected_rows(t, rows, steps)
    token_ids = _token_ids(t, tokens)
    scalars = seed_scalars(t)  # every refusal before any warning: a refused export says one line
    _warn_left_behind(t, [k for k in asked if k not in kinds and k not in in_metadata])

    plan = {"recorded_steps": ("int64", (len(rows),), t.steps[rows].astype("<i8"))}
    for name in kinds:
        kind = t.kinds[name]
        shape = list(kind.shape)
        if token_ids is not None and "token" in kind.dims:
            shape[kind.dims.index("token")] = len(token_ids)
        plan[name] = (kind.dtype, (len(rows), *shape), kind)
    for name in FLOAT_SCALARS:
        plan[name] = ("float32", (), np.float32(scalars[name]))
    for name in COUNT_SCALARS:
        plan[name] = ("int64", (), np.int64(scalars[name]))

    header, offset = {}, 0
    for name, (dtype, shape, _) in plan.items():
        size = int(np.prod(shape, dtype=np.int64)) * Kind((), dtype).numpy_dtype.itemsize
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {
        "format": "pt",
        "exported_by": f"wordystore {__version__}",
        **export_metadata(t, rows, token_ids, in_metadata),
    }
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
                with (
                    _progress(offset, f"export {out.name}", progress, "B") as bar,
                    ThreadPoolExecutor(threads or os.cpu_count()) as pool,
                ):
                    for name, (dtype, shape, source) in plan.items():
                        base = data_start + header[name]["data_offsets"][0]
                        if not isinstance(source, Kind):
                            os.pwrite(fd, np.asarray(source).tobytes(), base)
                            continue
                        tiles = _tiles(t, name, source, rows, token_ids)
                        for nbytes in pool.map(
                            lambda tile: _export_tile(fd, base, shape, t, name, tile, buffers), tiles
                        ):
                            bar.update(nbytes)
            finally:
                os.close(fd)
            os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def export_metadata(
    t: Trajectory, rows: np.ndarray, token_ids: np.ndarray | None, scalars: list[str]
) -> dict[str, str]:
    """The header's ``wordystore.*`` metadata: token sets (on the file's token axis), the config, and the
    0-d kinds ``scalars`` at ``rows``."""
    sets = t.token_sets
    meta = {}
    if token_ids is not None:  # a subset: each set's members among the exported tokens, as positions
        sets = {name: np.flatnonzero(np.isin(token_ids, ids)) for name, ids in sets.items()}
        meta[METADATA + "token_ids"] = json.dumps(token_ids.tolist())
    meta[METADATA + "token_sets"] = json.dumps({name: ids.tolist() for name, ids in sets.items()})
    meta[METADATA + "config"] = json.dumps(t.config)
    # the values' bytes as stored: little-endian, the only byte order wordystore runs on (bfloat16.register)
    meta[METADATA + "scalars"] = json.dumps(
        {
            name: {"dtype": t.kinds[name].dtype, "data": base64.b64encode(t[name].numpy(rows).tobytes()).decode()}
            for name in scalars
        }
    )
    return meta


def _warn_left_behind(t: Trajectory, kinds: list[str]) -> None:
    """Name what the notebook's layout cannot hold and the export leaves behind."""
    if kinds:
        warnings.warn(
            RoundTripWarning(
                f"kinds {kinds} are not in the notebook's layout and are not written; --kinds {','.join(kinds)} writes "
                "them as extra tensors"
            ),
            stacklevel=3,
        )
    if t.commit_record.states:
        warnings.warn(
            RoundTripWarning(
                "the run's resume state is not written: a store imported from this file cannot be resumed or extended"
            ),
            stacklevel=3,
        )


def _tiles(t: Trajectory, name: str, kind: Kind, rows: np.ndarray, token_ids) -> list[tuple]:
    """(output row offset, row indices, output token offset, token index) for every tile of a
    kind: a main chunk's worth of rows by a shard's worth of tokens."""
    main = t.layouts[name][0]
    row_block = main.chunk[0]
    if not kind.shape:
        return [(r, rows[r : r + row_block], None, None) for r in range(0, len(rows), row_block)]
    width, n = main.shard[1], kind.shape[0]
    tokens = np.arange(n) if token_ids is None or "token" not in kind.dims else np.asarray(token_ids)
    return [
        (r, rows[r : r + row_block], a, tokens[a : a + width])
        for r in range(0, len(rows), row_block)
        for a in range(0, len(tokens), width)
    ]


def _export_tile(
    fd: int, base: int, shape: tuple[int, ...], t: Trajectory, name: str, tile: tuple, buffers: threading.local
) -> int:
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
        t.read_into(name, tuple(fetch) + tuple(slice(0, n, 1) for n in tile_shape[len(fetch) :]), data)
    else:
        data = t[name].numpy((rows,) if tokens is None else (rows, tokens), orthogonal=True)
    step_bytes = data[0].nbytes if tokens is None else data[0].nbytes // len(tokens) * shape[1]
    token_bytes = 0 if tokens is None else data[0].nbytes // len(tokens)
    for i in range(len(rows)):
        os.pwrite(fd, data[i], base + (row0 + i) * step_bytes + (token0 or 0) * token_bytes)
    return data.nbytes


def import_seed_file(path, store, *, token_masks=None, overwrite=False, progress=True, predict=True) -> Trajectory:
    """Convert a notebook-layout safetensors file into a trajectory, bit for bit.

    Token sets, config and scalar kinds that an export wrote into the header's metadata come back.
    Tiles of rows are read from the file with plain reads straight into encode buffers (no memory
    map, so the file's pages never count against the process) and encoded on every core.

    Parameters
    ----------
    path : str or os.PathLike
        The safetensors file (the notebook's ``1.12f_wordybird_1b.safetensors``, or an export).
    store : str, os.PathLike or zarr store
        The trajectory to create.
    token_masks : str or os.PathLike, optional
        The notebook's token-mask file: its sets replace any the file's metadata names.
    overwrite : bool
        Replace a trajectory already at ``store`` (default: refuse).
    progress : bool
        Draw a progress bar.
    predict : bool
        Store Adam's moments as residuals of a replayed update, the smallest of the options
        measured on a sample (:func:`choose_predictions`); without, as they are.

    Returns
    -------
    Trajectory
        The new trajectory, open for reading.

    Examples
    --------
    >>> from wordystore.tools.safetensors_layout import import_seed_file
    >>> t = import_seed_file("last.safetensors", "runs/last.zarr")  # export's example wrote it
    >>> t.steps, t.embeddings.shape
    (array([2, 3, 4]), (3, 4083, 16))
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"{path} is a directory; expected a .safetensors file in the notebook's layout "
            "(wordystore import FILE STORE: the file comes first)"
        )
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
        expected = {
            "embeddings": [S, V, D],
            "grads": [S, V, D],
            "momentum": [S, V, D],
            "variance": [S, V, D],
            "logits": [S, V],
            "losses": [S],
        }
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
    sets, config, extra = import_metadata(path, header.get("__metadata__") or {}, S, V)
    if token_masks is not None:
        sets = token_sets_from_mask_file(token_masks, V)
    config.update(seed_scalars=scalars, imported_from=str(path.resolve()))
    kinds.update({name: Kind((), values.dtype.name, ()) for name, values in extra.items()})
    try:
        check_kinds(kinds)  # before any layout is cut for them (an exported empty token set has no tokens)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    fd = os.open(path, os.O_RDONLY)
    try:

        def read_tile(name: str, fetch: tuple, out: np.ndarray) -> None:
            """Rows ``fetch[0]`` and a range of the first per-step axis (later axes whole) of ``name``."""
            if name in extra:
                out[...] = extra[name][fetch[0]]
                return
            base = data_start + header[name]["data_offsets"][0]
            step_bytes = out[0].nbytes if out.ndim == 1 else out[0].nbytes // out.shape[1] * kinds[name].shape[0]
            skip = 0 if out.ndim == 1 else fetch[1].start * (out[0].nbytes // out.shape[1])
            for i, row in enumerate(range(fetch[0].start, fetch[0].stop)):
                target = memoryview(out[i : i + 1].reshape(-1).view(np.uint8))
                if os.preadv(fd, [target], base + row * step_bytes + skip) != len(target):
                    raise ValueError(f"{path} is truncated: {name} row {row} is incomplete")

        predictions = {}
        if predict:
            predictions, added, config["import_prediction"] = choose_predictions(
                read_tile, kinds, extra, scalars, config, S, progress
            )
            extra.update(added)
            kinds.update({name: CLIP for name in added})
        with (
            create_whole(
                store, kinds, token_sets=sets, config=config, overwrite=overwrite, predictions=predictions
            ) as w,
            _progress(S, f"import {path.name}", progress, "row") as bar,
        ):
            w.bulk_append(steps, read_tile, progress=bar.update)
    finally:
        os.close(fd)
    return trajectory.open(store)


def choose_predictions(
    read_tile,
    kinds: dict[str, Kind],
    extra: dict[str, np.ndarray],
    scalars: dict,
    config: dict,
    rows: int,
    progress: bool,
) -> tuple[dict, dict[str, np.ndarray], dict]:
    """The predictions of ``momentum`` and ``variance`` an import stores, the 0-d kinds it adds
    (``clip_coef``, kept whichever option is chosen: imports of parts of one run have the same
    kinds, and stitch), and what was measured, for the config.

    The options, with the file's betas (:func:`_as_given`): ``estimated`` (each step's clip
    coefficient estimated from a sample of its moments and gradient, or the file's ``clip_coef``
    when an export of an imported store carried it), ``grad_norm`` (the file's gradient norms,
    when an export carried them, clipped at the run's ``max_grad_norm``, 1.0 by default as in the
    Hugging Face Trainer), ``unclipped`` (the seed's hyperparameters alone: no clipping) and
    ``plain`` (no prediction). Each is encoded on the same sample, ``SAMPLED_CHUNKS`` token chunks
    of every row as the compact profile cuts them, and the smallest in bytes is chosen.
    """
    beta1, beta2 = _as_given(scalars["adam_beta1"]), _as_given(scalars["adam_beta2"])
    compact = Profile("compact")
    sample = _sample_tokens(compact.main_layout("momentum", kinds["momentum"], 0).chunk[1], kinds["momentum"].shape[0])
    added = {}
    if CLIP_KIND not in extra:
        added[CLIP_KIND] = _estimate_clips(read_tile, kinds, sample, rows, beta1, progress)
    clips = {**extra, **added}
    options = {
        "estimated": adam_predictions(beta1, beta2, None, grad_norm=None, clip=CLIP_KIND),
        "unclipped": adam_predictions(beta1, beta2, None, grad_norm=None),
    }
    if "grad_norm" in extra:
        args = config.get("training_arguments") if isinstance(config.get("training_arguments"), dict) else {}
        max_norm = args.get("max_grad_norm", 1.0)
        max_norm = float(max_norm) if isinstance(max_norm, (int, float)) and not isinstance(max_norm, bool) else 1.0
        options["grad_norm"] = adam_predictions(beta1, beta2, max_norm or None)
    measured = _sample_bytes(read_tile, kinds, options, clips, sample, rows)
    chosen = min(measured, key=measured.get)
    record = {
        "chosen": chosen,
        "sample_bytes": measured,
        "sampled_tokens": int(sum(len(t) for t in sample)),
        "clip_coef": "estimated" if added else "from the file",
    }
    return options.get(chosen, {}), added, record


def _as_given(value: float) -> float:
    """A hyperparameter the file holds as float32 (``adam_beta1``: 0.8999999761...) as the
    shortest decimal that rounds to it (0.9), the value the run was given: the replay computes
    ``1 - beta`` from it in float64, as torch does."""
    return float(str(np.float32(value)))


def _sample_tokens(width: int, vocab: int) -> list[np.ndarray]:
    """Up to ``SAMPLED_CHUNKS`` chunks of ``width`` tokens spread evenly over the token axis, as
    positions (the compact profile's inner chunks, so their encoded sizes are the store's): whole
    chunks, unless the axis has none."""
    chunks = max(vocab // width, 1)
    picked = np.unique(np.linspace(0, chunks - 1, min(SAMPLED_CHUNKS, chunks)).round().astype(int))
    return [np.arange(c * width, min((c + 1) * width, vocab)) for c in picked]


def _read_sample(read_tile, kind: Kind, name: str, rows: slice, sample: list[np.ndarray]) -> list[np.ndarray]:
    """Rows ``rows`` of kind ``name`` at each chunk of sampled tokens."""
    out = []
    for tokens in sample:
        out.append(np.empty((rows.stop - rows.start, len(tokens), *kind.shape[1:]), kind.numpy_dtype))
        read_tile(name, (rows, slice(int(tokens[0]), int(tokens[-1]) + 1, 1)), out[-1])
    return out


def _row_chunks(rows: int):
    """The import's chunks of rows, as the compact profile's main tier cuts them."""
    return [slice(start, min(start + CHUNK_ROWS, rows), 1) for start in range(0, rows, CHUNK_ROWS)]


def _estimate_clips(
    read_tile, kinds: dict[str, Kind], sample: list[np.ndarray], rows: int, beta1: float, progress: bool
) -> np.ndarray:
    """Each row's clip coefficient (float32), from the sampled tokens of its momentum, the row
    before it (zeros before row 0) and its gradient."""
    clips = np.ones(rows, np.float32)
    with _progress(rows, "import: estimating clipping", progress, "row") as bar:
        for chunk in _row_chunks(rows):
            before = slice(max(chunk.start - 1, 0), chunk.stop, 1)
            moment, grads = (
                np.concatenate([a.reshape(len(a), -1) for a in _read_sample(read_tile, kinds[k], k, before, sample)], 1)
                for k in ("momentum", "grads")
            )
            if chunk.start == 0:  # row 0 follows zeros
                moment, grads = np.concatenate([np.zeros_like(moment[:1]), moment]), np.concatenate([grads[:1], grads])
            for i in range(1, len(moment)):
                clips[chunk.start + i - 1] = estimate_clip(moment[i - 1], moment[i], grads[i], beta1)
            bar.update(chunk.stop - chunk.start)
    return clips


def _sample_bytes(
    read_tile,
    kinds: dict[str, Kind],
    options: dict[str, dict],
    scalars: dict[str, np.ndarray],
    sample: list[np.ndarray],
    rows: int,
) -> dict[str, int]:
    """The encoded bytes of the sampled chunks of ``momentum`` and ``variance`` under each option's
    predictions (and ``plain``: as they are), as the compact profile's main tier stores them;
    ``scalars`` holds the 0-d kinds the predictions read."""
    compact = Profile("compact")
    sizes = dict.fromkeys([*options, "plain"], 0)
    for chunk in _row_chunks(rows):
        grads = _read_sample(read_tile, kinds["grads"], "grads", chunk, sample)
        for name in ("momentum", "variance"):
            values = _read_sample(read_tile, kinds[name], name, chunk, sample)
            plain = compact.main_layout(name, kinds[name], 0)
            sizes["plain"] += sum(encoded_nbytes(plain.codecs.encode(v)) for v in values)
            for option, predictions in options.items():
                prediction = predictions[name]
                layout = compact.main_layout(name, kinds[name], 0, prediction=prediction)
                for v, g in zip(values, grads):
                    inputs = [g, *(scalars[k][chunk] for k in prediction.inputs[1:])]
                    sizes[option] += encoded_nbytes(layout.codecs.encode(prediction.residuals(v, inputs)))
    return sizes


def import_metadata(path: Path, meta: dict, rows: int, vocab: int) -> tuple[dict | None, dict, dict[str, np.ndarray]]:
    """(token sets or None, config, {0-d kind: its ``rows`` values}) from a header's ``wordystore.*``
    metadata, each checked: a file is anyone's, and what it says is validated before it is stored."""

    def field(key: str, kind: type, expected: str):
        try:
            value = json.loads(meta[METADATA + key])
        except (TypeError, json.JSONDecodeError):
            value = None
        if not isinstance(value, kind):
            raise ValueError(f"{path}: header metadata '{METADATA + key}' is not {expected}")
        return value

    unknown = sorted(
        k
        for k in meta
        if k.startswith(METADATA) and k[len(METADATA) :] not in ("token_sets", "token_ids", "config", "scalars")
    )
    if unknown:
        warnings.warn(
            RoundTripWarning(
                f"{path}: header metadata {unknown} is not known to wordystore {__version__}; not imported"
            ),
            stacklevel=3,
        )
    sets = None
    if METADATA + "token_sets" in meta:
        sets = field("token_sets", dict, "a JSON object of token sets")
        for name, ids in sets.items():
            if not (isinstance(ids, list) and all(type(i) is int and 0 <= i < vocab for i in ids)):
                raise ValueError(
                    f"{path}: header metadata token set {name!r} is not a list of token positions in [0, {vocab})"
                )
        sets = {name: np.array(ids, np.int64) for name, ids in sets.items()}
    config = field("config", dict, "a JSON object (the store's config)") if METADATA + "config" in meta else {}
    if METADATA + "token_ids" in meta:
        ids = field("token_ids", list, f"a list of {vocab} token ids")
        if len(ids) != vocab or not all(type(i) is int and i >= 0 for i in ids):
            raise ValueError(f"{path}: header metadata '{METADATA}token_ids' is not a list of {vocab} token ids")
        config["token_ids"] = ids  # the vocabulary id of each token position: an export of a subset
    extra = {}
    for name, spec in (
        field("scalars", dict, "a JSON object of scalar kinds") if METADATA + "scalars" in meta else {}
    ).items():
        dtype = spec.get("dtype") if isinstance(spec, dict) else None
        if name in STEP_KINDS or dtype not in DTYPES:
            raise ValueError(f"{path}: header metadata scalar kind {name!r} is not a 0-d kind of a known dtype")
        try:
            data = base64.b64decode(spec.get("data"), validate=True)
        except (TypeError, ValueError):
            data = None
        values = Kind((), dtype).numpy_dtype
        if data is None or len(data) != rows * values.itemsize:
            raise ValueError(f"{path}: header metadata scalar kind {name!r} does not hold {rows} {dtype} values")
        extra[name] = np.frombuffer(data, values)
    return sets, config, extra


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
        return ":".join("" if v is None else str(v) for v in (selection.start, selection.stop, selection.step)).rstrip(
            ":"
        )
    return str(selection)


def _token_ids(t: Trajectory, tokens) -> np.ndarray | None:
    """``tokens`` (a token-set name, or token ids) as ids checked against the token axis."""
    if tokens is None or isinstance(tokens, str):
        return None if tokens is None else t.token_set(tokens)
    ids = np.asarray(tokens)
    if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
        raise ValueError(f"tokens must be a token-set name or a non-empty list of token ids, got {tokens!r}")
    vocab = vocab_size(t.kinds)
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
