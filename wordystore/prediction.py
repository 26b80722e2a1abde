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

    NAME = "adam"  # how documents name this prediction (``"name"``; format 2 named none)

    def to_json(self) -> dict:
        return {"name": self.NAME, "moment": self.moment, "grads": self.grads, "grad_norm": self.grad_norm,
                "beta": self.beta, "max_norm": self.max_norm}

    @classmethod
    def from_json(cls, doc: dict) -> "AdamPrediction":
        def number(value) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{value!r} is not a number")
            return float(value)

        if not all(isinstance(doc[k], str) for k in ("moment", "grads", "grad_norm")):
            raise ValueError(f"an Adam prediction names its moment, grads and grad_norm kinds: {doc!r}")
        return cls(doc["moment"], doc["grads"], doc["grad_norm"], number(doc["beta"]),
                   None if doc.get("max_norm") is None else number(doc["max_norm"]))

    def _predict(self, prev: np.ndarray, grad: np.ndarray, norm: np.float32) -> np.ndarray:
        """float32 ``prev`` and a bfloat16 ``grad`` (or its uint16 bits, as the compact profile
        stores it) -> the predicted row's bfloat16 bits (uint16)."""
        f32 = np.float32
        grad = grad.view(BFLOAT16) if grad.dtype == np.uint16 else grad
        c = f32(1)
        if self.max_norm is not None:
            c = _bf16(np.minimum(f32(1), f32(self.max_norm) / (_bf16(norm) + f32(1e-6))))
        g = _bf16(grad.astype(f32) * c)
        if self.moment == "exp_avg":
            pred = prev + f32(1 - self.beta) * (g - prev)
        else:
            pred = _bf16(prev * f32(self.beta)) + f32(1 - self.beta) * g * g
        bits = pred.astype(BFLOAT16).view(np.uint16)
        bits[np.isnan(pred)] = CANONICAL_NAN  # NaN payloads from arithmetic differ between machines
        return bits

    def residuals(self, moment: np.ndarray, grads: np.ndarray, norms: np.ndarray, axis: int = 0) -> np.ndarray:
        """int16 residuals of the moment rows along ``axis`` (the chunk's rows, from its first)."""
        return self._replay(moment.view(np.uint16), grads, norms, axis, encode=True).view(np.int16)

    def rebuild(self, residuals: np.ndarray, grads: np.ndarray, norms: np.ndarray, axis: int = 0) -> np.ndarray:
        """The moment rows' bfloat16 bits (uint16) from their residuals: :meth:`residuals` undone."""
        return self._replay(residuals.view(np.uint16), grads, norms, axis, encode=False)

    def _replay(self, data: np.ndarray, grads: np.ndarray, norms: np.ndarray, axis: int, encode: bool) -> np.ndarray:
        """Walk the rows in order, predicting each from the moment row before it: ``encode`` turns
        moment bits into residuals (``moment - pred``), else residuals into moment bits (``pred +
        residual``), both mod 2**16. The result is C-ordered like ``data``. The walk runs on
        row-major copies: in a chunk's stored order each row is strided, and 5x slower to compute on."""
        rows, grads = (np.ascontiguousarray(np.moveaxis(a, axis, 0)) for a in (data, grads))
        out = np.empty(rows.shape, np.uint16)
        prev = np.zeros(rows.shape[1:], np.float32)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            for r in range(rows.shape[0]):
                pred = self._predict(prev, grads[r], norms[r])
                if encode:
                    np.subtract(rows[r], pred, out=out[r])
                    moment = rows[r]
                else:
                    np.add(pred, rows[r], out=out[r])
                    moment = out[r]
                prev = moment.view(BFLOAT16).astype(np.float32)
        return np.ascontiguousarray(np.moveaxis(out, 0, axis))


CANONICAL_NAN = 0x7FC0  # the bfloat16 quiet NaN a NaN prediction is taken as
PREDICTIONS = {AdamPrediction.NAME: AdamPrediction}  # every prediction a store may name


def prediction_from_json(doc) -> AdamPrediction:
    """The prediction a document describes, by its ``name`` (``adam`` when it names none, as format 2's)."""
    if not isinstance(doc, dict):
        raise TypeError(f"a prediction is a JSON object, not {doc!r}")
    name = doc.get("name", AdamPrediction.NAME)
    if name not in PREDICTIONS:
        raise ValueError(f"prediction {name!r} is not one of {sorted(PREDICTIONS)}")
    return PREDICTIONS[name].from_json(doc)


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
