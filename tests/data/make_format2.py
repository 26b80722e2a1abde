"""Writes the format-2 stores under tests/data/format2/ (kept in the repository: format 2 can no
longer be written). They were made by wordystore 0.2.0 at commit 64f5604, the last to write
format 2, with:

    python tests/data/make_format2.py tests/data/format2

Each holds the same 13 rows (``rows(STEPS)``), two token sets and a resume state:
``compact.zarr`` and ``portable.zarr`` closed (every row compacted), ``hot.zarr`` (compact, chunks of 8
rows) copied while its writer was open, with rows 8..12 in the hot tier.
"""

import shutil
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import torch

import wordystore
from wordystore import AdamPrediction
from wordystore import Kind

KINDS = {
    "emb": Kind((6, 2), "bfloat16", ("token", "dim")),
    "grads": Kind((6, 2), "bfloat16", ("token", "dim")),
    "momentum": Kind((6, 2), "bfloat16", ("token", "dim")),
    "grad_norm": Kind((), "float32"),
    "loss": Kind((), "float32"),
}
PREDICTIONS = {"momentum": AdamPrediction("exp_avg", "grads", "grad_norm", 0.9, 1.0)}
TOKEN_SETS = {"a": [0, 2, 4], "b": [1, 3, 5]}
STEPS = [3 * i + 1 for i in range(13)]


def row(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)

    def bf16(shape):
        return rng.standard_normal(shape).astype(np.float32).astype(ml_dtypes.bfloat16)

    grads = bf16((6, 2))
    return {"emb": bf16((6, 2)), "grads": grads, "momentum": bf16((6, 2)) * ml_dtypes.bfloat16(0.01),
            "grad_norm": np.float32(np.linalg.norm(grads.astype(np.float32))), "loss": np.float32(step / 7)}


def rows(steps) -> dict[str, np.ndarray]:
    per_step = [row(step) for step in steps]
    return {name: np.stack([r[name] for r in per_step]) for name in KINDS}


def state(step: int):
    return {"weights": torch.full((3,), float(step))}, {"after_step": step}


def write(path: Path, profile: str, close: bool = True, chunk_rows: int = 4):
    w = wordystore.create(path, KINDS, token_sets=TOKEN_SETS, config={"suite": "format2"}, profile=profile,
                          block_rows=2, chunk_rows=chunk_rows, predictions=PREDICTIONS if profile == "compact" else None)
    w.set_state_provider(lambda: state(w.last_step))
    for step in STEPS:
        w.append(step, **row(step))
    if close:
        w.close()
    return w


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    write(out / "compact.zarr", "compact")
    write(out / "portable.zarr", "portable")
    w = write(out / ".hot-writing.zarr", "compact", close=False, chunk_rows=8)
    w.flush()
    while wordystore.open(out / ".hot-writing.zarr").commit_record.compacted_rows < 8:
        time.sleep(0.01)
    time.sleep(0.5)  # the compaction deletes its hot copies after committing
    shutil.copytree(out / ".hot-writing.zarr", out / "hot.zarr", ignore=shutil.ignore_patterns(".wordystore-writer.lock"))
    w.close()
    shutil.rmtree(out / ".hot-writing.zarr")
    for lock in out.glob("*.zarr/.wordystore-writer.lock"):
        lock.unlink()
