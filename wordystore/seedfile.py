"""The seed notebook's single-safetensors layout: streaming export to it and import from it.

Layout ("Save Recorded Data" in the notebook): ``recorded_steps`` int64 [S]; ``embeddings``,
``grads``, ``momentum``, ``variance`` bfloat16 [S, V, D]; ``logits`` bfloat16 [S, V]; ``losses``
bfloat16 [S]; 0-dim float32 ``init_scale``, ``learning_rate``, ``weight_decay``, ``adam_beta1``,
``adam_beta2``; 0-dim int64 ``n_trained``, ``n_untrained``.

Export writes the safetensors file itself, tensor by tensor and a few steps at a time, so memory
stays bounded whatever the trajectory's length; it writes to a temporary name and renames at the end.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

import wordystore
from wordystore.kinds import Kind
from wordystore.tokensets import token_sets_from_mask_file
from wordystore.trajectory import Trajectory

STEP_KINDS = ("embeddings", "grads", "momentum", "variance", "logits", "losses")
FLOAT_SCALARS = ("init_scale", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2")
COUNT_SCALARS = ("n_trained", "n_untrained")
ST_DTYPES = {"bfloat16": "BF16", "float32": "F32", "int64": "I64", "float16": "F16", "float64": "F64",
             "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
STEPS_PER_READ = 8


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled)


def seed_scalars(t: Trajectory) -> dict[str, float | int]:
    """The notebook's scalars for ``t``: kept from an import, else from the trainer's run config."""
    if "seed_scalars" in t.config:
        return dict(t.config["seed_scalars"])
    run = t.config.get("run")
    if run is None:
        raise ValueError("the trajectory has neither 'seed_scalars' nor a trainer 'run' config to export scalars from")
    sets = t.metadata["token_sets"]
    if "trained" not in sets or "untrained" not in sets:
        raise ValueError(f"export needs token sets 'trained' and 'untrained'; the trajectory has {sets}")
    scalars = {name: run[name] for name in FLOAT_SCALARS}
    scalars.update(n_trained=len(t.token_set("trained")), n_untrained=len(t.token_set("untrained")))
    return scalars


def export(store, out, *, steps=slice(None), tokens=None, kinds=None, overwrite=False, progress=True) -> Path:
    """Write the trajectory at ``store`` to ``out`` in the notebook's layout.

    ``steps`` selects rows (a slice or row indices), ``tokens`` a token subset (a token-set name or
    ids), ``kinds`` some of the per-step kinds only. Returns the path written.
    """
    t = wordystore.open(store)
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    kinds = list(STEP_KINDS if kinds is None else kinds)
    unknown = [k for k in kinds if k not in t.kinds]
    if unknown:
        raise ValueError(f"kinds {unknown} are not in the trajectory; it has {list(t.kinds)}")
    rows = np.arange(len(t))[steps]
    token_ids = t.token_set(tokens) if isinstance(tokens, str) else tokens

    def read_rows(name: str, kind: Kind, block_rows: np.ndarray) -> np.ndarray:
        block = t[name].numpy(block_rows)
        if token_ids is not None and "token" in kind.dims:
            block = np.take(block, np.asarray(token_ids), axis=1 + kind.dims.index("token"))
        return block

    plan = {"recorded_steps": ("int64", (len(rows),), None)}
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
    header["__metadata__"] = {"format": "pt", "exported_by": f"wordystore {wordystore.__version__}"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "wb") as f, _progress(offset, f"export {out.name}", progress) as bar:
            f.write(struct.pack("<Q", len(blob)) + blob)
            for name, (dtype, shape, source) in plan.items():
                if name == "recorded_steps":
                    f.write(t.steps[rows].astype("<i8").tobytes())
                elif isinstance(source, Kind):
                    for start in range(0, len(rows), STEPS_PER_READ):
                        block = read_rows(name, source, rows[start : start + STEPS_PER_READ])
                        f.write(block.tobytes())
                        bar.update(block.nbytes)
                else:
                    f.write(np.asarray(source).tobytes())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def import_seed_file(path, store, *, token_masks=None, overwrite=False, progress=True) -> Trajectory:
    """Convert a notebook-layout safetensors file into a trajectory, streaming one step at a time."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        f = safe_open(str(path), framework="pt")
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
        sets = None
        if token_masks is not None:
            sets = token_sets_from_mask_file(token_masks, V)
        config = {"seed_scalars": scalars, "imported_from": str(path.resolve())}
        with wordystore.create(store, kinds, token_sets=sets, config=config, overwrite=overwrite) as w, \
                _progress(S, f"import {path.name}", progress) as bar:
            for row in range(S):
                w.append(int(steps[row]), **{name: f.get_slice(name)[row] for name in kinds})
                bar.update(1)
    return wordystore.open(store)


