"""Adam's moments as residuals of a replayed update: the prediction the compact profile's main tier
stores predicted moments against (docs/format.md, "Predicted moments"). Pure numpy, beside the codecs
it feeds: :class:`wordystore.reading.ChunkReader` rebuilds a chunk with :meth:`AdamPrediction.rebuild`,
compaction encodes one with :meth:`AdamPrediction.residuals`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wordystore.bfloat16 import NUMPY_BFLOAT16 as BFLOAT16


@dataclass(frozen=True)
class AdamPrediction:
    """Adam's moment rows stored as residuals against a prediction (compact profile, main tier).

    Row ``r`` of a moment is predicted from the row before it and the recorded *pre-clip*
    gradient row, replaying one bfloat16 AdamW update in float32 (the first row of each main
    chunk is predicted from zeros, so every chunk decodes on its own)::

        c   = bf16(min(1, max_norm / (bf16(grad_norm[r]) + 1e-6)))      # 1 without max_norm
        g   = bf16(grads[r] * c)                                          # the clipped gradient
        exp_avg:    pred = bf16(prev + f32(1 - beta) * (g - prev))
        exp_avg_sq: pred = bf16(bf16(prev * f32(beta)) + f32(1 - beta) * g * g)

    all in float32 arithmetic, one rounding per operation (IEEE, round to nearest even), a NaN
    prediction taken as the bits 0x7FC0. The
    stored value is ``(bits(row) - bits(pred)) mod 2**16`` as int16; a reader adds it back. It is
    lossless whatever the prediction's quality; on the seed run 97-99% of the residuals are 0.
    """

    moment: str  # "exp_avg" or "exp_avg_sq"
    grads: str  # the kind holding the pre-clip gradient rows (same shape)
    grad_norm: str  # the 0-d float32 kind holding the gradient's global L2 norm
    beta: float
    max_norm: float | None = None

    def __post_init__(self):
        if self.moment not in ("exp_avg", "exp_avg_sq"):
            raise ValueError(f"AdamPrediction moment must be 'exp_avg' or 'exp_avg_sq', got {self.moment!r}")

    def to_json(self) -> dict:
        return {"moment": self.moment, "grads": self.grads, "grad_norm": self.grad_norm, "beta": self.beta,
                "max_norm": self.max_norm}

    @classmethod
    def from_json(cls, doc: dict) -> "AdamPrediction":
        return cls(doc["moment"], doc["grads"], doc["grad_norm"], float(doc["beta"]),
                   None if doc.get("max_norm") is None else float(doc["max_norm"]))

    def _clip(self, norms: np.ndarray) -> np.ndarray:
        """Each row's clipping coefficient ``c`` from its gradient norm (float32, one per row)."""
        f32 = np.float32
        if self.max_norm is None:
            return np.ones(len(norms), f32)
        return _bf16(np.minimum(f32(1), f32(self.max_norm) / (_bf16(np.asarray(norms, f32)) + f32(1e-6))))

    def _predict(self, prev: np.ndarray, grad: np.ndarray, clip: np.ndarray) -> np.ndarray:
        """float32 ``prev`` rows, their bfloat16 ``grad`` rows (or the uint16 bits, as the compact
        profile stores them) and clipping coefficients -> the predicted rows' bfloat16 bits (uint16).
        Rows along the first axis; any number of them at once."""
        f32 = np.float32
        grad = grad.view(BFLOAT16) if grad.dtype == np.uint16 else grad
        g = _bf16(grad.astype(f32) * clip.reshape(-1, *(1,) * (grad.ndim - 1)))
        if self.moment == "exp_avg":
            pred = prev + f32(1 - self.beta) * (g - prev)
        else:
            pred = _bf16(prev * f32(self.beta)) + f32(1 - self.beta) * g * g
        bits = pred.astype(BFLOAT16).view(np.uint16)
        bits[np.isnan(pred)] = CANONICAL_NAN  # NaN payloads from arithmetic differ between machines
        return bits

    def residuals(self, moment: np.ndarray, grads: np.ndarray, norms: np.ndarray, axis: int = 0,
                  in_place: bool = False) -> np.ndarray:
        """int16 residuals of the moment rows along ``axis`` (the chunk's rows, from its first);
        ``in_place``: written over ``moment`` (C-ordered, rows first), which saves a tile of memory.
        Each row is predicted from the recorded row before it, so the rows are predicted all at
        once, ``ROWS_AT_ONCE`` at a time: a few numpy calls per chunk rather than per row (each
        call takes the GIL, which a training loop on a GPU needs)."""
        bits, grads = (np.ascontiguousarray(np.moveaxis(a, axis, 0)) for a in (moment.view(np.uint16), grads))
        out = bits if in_place else np.empty(bits.shape, np.uint16)
        clip = self._clip(norms)
        prev = np.zeros((min(ROWS_AT_ONCE, len(bits)), *bits.shape[1:]), np.float32)  # before the first row: zeros
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            for a in range(0, len(bits), ROWS_AT_ONCE):
                b = min(a + ROWS_AT_ONCE, len(bits))
                if a:
                    prev[0] = last.view(BFLOAT16)
                prev[1 : b - a] = bits[a : b - 1].view(BFLOAT16)
                last = bits[b - 1].copy()  # the next rows' first prediction needs it, as recorded
                np.subtract(bits[a:b], self._predict(prev[: b - a], grads[a:b], clip[a:b]), out=out[a:b])
        return np.ascontiguousarray(np.moveaxis(out, 0, axis)).view(np.int16)

    def rebuild(self, residuals: np.ndarray, grads: np.ndarray, norms: np.ndarray, axis: int = 0) -> np.ndarray:
        """The moment rows' bfloat16 bits (uint16) from their residuals: :meth:`residuals` undone.
        Row by row, each predicted from the one just rebuilt. The walk runs on row-major copies: in
        a chunk's stored order each row is strided, and 5x slower to compute on. The result is
        C-ordered like ``residuals``."""
        rows, grads = (np.ascontiguousarray(np.moveaxis(a, axis, 0)) for a in (residuals.view(np.uint16), grads))
        clip = self._clip(norms)
        out = np.empty(rows.shape, np.uint16)
        prev = np.zeros((1, *rows.shape[1:]), np.float32)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            for r in range(rows.shape[0]):
                np.add(self._predict(prev, grads[r : r + 1], clip[r : r + 1])[0], rows[r], out=out[r])
                prev[0] = out[r].view(BFLOAT16)
        return np.ascontiguousarray(np.moveaxis(out, 0, axis))


ROWS_AT_ONCE = 4  # rows :meth:`AdamPrediction.residuals` predicts at once (its float32 temporaries stay small)
CANONICAL_NAN = 0x7FC0  # the bfloat16 quiet NaN a NaN prediction is taken as


def _bf16(x) -> np.ndarray:
    """Round float32 to bfloat16 and back (nearest even): one bfloat16 operation's rounding."""
    return np.asarray(x, np.float32).astype(BFLOAT16).astype(np.float32)


def adam_predictions(beta1: float, beta2: float, max_norm: float | None, grads: str = "grads",
                     grad_norm: str = "grad_norm") -> dict[str, AdamPrediction]:
    """The predictions of the seed kinds ``momentum`` and ``variance`` for an AdamW run with these
    betas and gradient clipping (``max_norm``; None for none), recorded every step.

    >>> wordystore.create(path, kinds, predictions=wordystore.adam_predictions(0.9, 0.999, 1.0))
    """
    return {"momentum": AdamPrediction("exp_avg", grads, grad_norm, beta1, max_norm),
            "variance": AdamPrediction("exp_avg_sq", grads, grad_norm, beta2, max_norm)}
