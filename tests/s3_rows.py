"""Rows for the object-storage tests: reproducible row by row, so that a resumed writer (another
process) appends the same bytes and any reader checks any row; and the writer the kill -9 test
runs in a process of its own.

    python tests/s3_rows.py URL VOCAB ROWS      # creates URL and appends ROWS rows, printing
                                                # "committed N" after each; credentials from AWS_*

As in the seed run, a tenth of the tokens train: the rest keep their embedding and have zero
gradients and moments.
"""

from __future__ import annotations

import sys

import numpy as np

import wordystore
from wordystore.format.bfloat16 import NUMPY_BFLOAT16 as BF16


class Rows:
    def __init__(self, vocab: int = 512, dim: int = 8, seed: int = 0):
        self.vocab, self.dim, self.seed = vocab, dim, seed
        rng = np.random.default_rng(seed)
        self.trained = np.sort(rng.choice(vocab, max(1, vocab // 10), replace=False))
        self.untrained = np.setdiff1d(np.arange(vocab), self.trained)
        self.e0 = rng.standard_normal((vocab, dim), np.float32) * 0.02

    def kinds(self):
        return wordystore.seed_kinds(self.vocab, self.dim)

    def row(self, r: int) -> dict:
        rng = np.random.default_rng((self.seed, r))
        emb, grads = self.e0.copy(), np.zeros((self.vocab, self.dim), np.float32)
        grads[self.trained] = rng.standard_normal((len(self.trained), self.dim), np.float32) * 1e-3
        emb[self.trained] += (r + 1) * 1e-4
        return {
            "embeddings": emb.astype(BF16),
            "grads": grads.astype(BF16),
            "momentum": (0.1 * grads).astype(BF16),
            "variance": (grads * grads).astype(BF16),
            "logits": rng.standard_normal(self.vocab).astype(BF16),
            "losses": np.asarray(3.0 - r * 1e-3, BF16),
            "learning_rate": np.float32(1e-3),
            "grad_norm": np.float32(1.0 + r),
            "grad_norm_clipped": np.float32(1.0),
        }

    @staticmethod
    def step(r: int) -> int:
        return 10 * r

    def append(self, writer, start: int, stop: int) -> None:
        for r in range(start, stop):
            writer.append(self.step(r), **self.row(r))

    def check(self, trajectory, n: int | None = None) -> int:
        """Compare every committed row (or the first ``n``) of every kind with :meth:`row`, bit for bit;
        returns the rows checked; AssertionError names the first that differs."""
        n = len(trajectory) if n is None else n
        assert list(trajectory.steps[:n]) == [self.step(r) for r in range(n)], "recorded steps differ"
        for name, kind in self.kinds().items():
            got = trajectory[name].numpy(slice(0, n))
            for r in range(n):
                want = self.row(r)[name]
                assert got[r].tobytes() == np.asarray(want, kind.numpy_dtype).tobytes(), f"{name} row {r} differs"
        return n


if __name__ == "__main__":
    url, vocab, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rows = Rows(vocab)
    writer = wordystore.create(url, rows.kinds(), token_sets={"untrained": rows.untrained})
    for r in range(n):
        rows.append(writer, r, r + 1)
        print(f"committed {writer.committed}", flush=True)
    writer.close()
    print("closed", flush=True)
