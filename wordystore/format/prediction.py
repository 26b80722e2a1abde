"""Predicted kinds: a kind's main-tier rows stored as residuals against a replay of the optimizer
(docs/format.md, "Predicted kinds"). Pure numpy, beside the codecs it feeds:
:class:`wordystore.read.reading.ChunkReader` rebuilds a chunk with ``rebuild``, compaction encodes one
with ``residuals``.

- :class:`AdamPrediction` (``"adam"``): Adam's moments from the gradients and each step's clipping;
- :class:`AdamStepPrediction` (``"adamw_step"``): a parameter from its row before and this row's
  moments, AdamW's whole step replayed (the archive profile).

Every prediction names the arrays it reads (``inputs``): the same rows of kinds of the predicted
kind's shape, or of 0-d arrays (one value per row). It predicts a chunk's rows from its first row on,
so that every chunk decodes on its own, and stores ``(bits(row) - bits(prediction)) mod 2**16`` as
int16: lossless whatever the prediction's quality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from wordystore.format.bfloat16 import NUMPY_BFLOAT16 as BFLOAT16


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{value!r} is not a number")
    return float(value)


def _names(doc: dict, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """The prediction document ``doc`` names its input arrays with strings."""
    if not all(isinstance(doc[k], str) for k in required) or not all(
        doc.get(k) is None or isinstance(doc[k], str) for k in optional
    ):
        raise ValueError(f"a {doc.get('name')!r} prediction names its arrays {list(required + optional)}: {doc!r}")


@dataclass(frozen=True)
class AdamPrediction:
    """Adam's moment rows stored as residuals against a prediction (compact profile, main tier).

    Row ``r`` of a moment is predicted from the row before it and the recorded *pre-clip*
    gradient row, replaying one bfloat16 AdamW update in float32 (the first row of each main
    chunk is predicted from zeros, so every chunk decodes on its own)::

        c   = clip[r]                                                     # with clip coefficients, else
        c   = bf16(min(1, max_norm / (bf16(grad_norm[r]) + 1e-6)))      # 1 without max_norm
        g   = bf16(grads[r] * c)                                          # the clipped gradient
        exp_avg:    pred = bf16(prev + f32(1 - beta) * (g - prev))
        exp_avg_sq: pred = bf16(bf16(prev * f32(beta)) + f32(1 - beta) * g * g)

    all in float32 arithmetic, one rounding per operation (IEEE, round to nearest even), a NaN
    prediction taken as the bits 0x7FC0. The
    stored value is ``(bits(row) - bits(pred)) mod 2**16`` as int16; a reader adds it back. It is
    lossless whatever the prediction's quality; on the seed run 97-99% of the residuals are 0.

    Each step's clipping comes from the gradient's global norm (``grad_norm``, a 0-d kind, and
    ``max_norm``, as the trainer records it), or from ``clip``, a 0-d float32 kind holding each
    row's coefficient ``c`` itself (as ``wordystore import`` estimates it from a notebook file,
    which has no norms: :func:`estimate_clip`); with neither, ``c = 1``.
    """

    moment: str  # "exp_avg" or "exp_avg_sq"
    grads: str  # the kind holding the pre-clip gradient rows (same shape)
    grad_norm: str | None  # the 0-d float32 kind holding the gradient's global L2 norm
    beta: float
    max_norm: float | None = None
    clip: str | None = None  # the 0-d float32 kind holding each row's clip coefficient, instead of the norms

    def __post_init__(self):
        if self.moment not in ("exp_avg", "exp_avg_sq"):
            raise ValueError(f"AdamPrediction moment must be 'exp_avg' or 'exp_avg_sq', got {self.moment!r}")
        if self.clip is not None and (self.grad_norm is not None or self.max_norm is not None):
            raise ValueError(
                "an Adam prediction takes each step's clipping from clip coefficients or from gradient "
                f"norms, not both: clip {self.clip!r}, grad_norm {self.grad_norm!r}"
            )

    NAME = "adam"  # how documents name this prediction (``"name"``; format 2 named none)
    TENSORS = 1  # the first inputs are kinds of the moment's shape, the others 0-d

    @property
    def inputs(self) -> tuple[str, ...]:
        """The arrays whose same rows the replay reads: the gradients, then the clip coefficients
        or the gradient norms (if it names either)."""
        clipping = self.clip if self.clip is not None else self.grad_norm
        return (self.grads,) if clipping is None else (self.grads, clipping)

    def to_json(self) -> dict:
        doc = {"name": self.NAME, "moment": self.moment, "grads": self.grads}
        if self.clip is not None:
            doc["clip"] = self.clip
        else:
            doc.update(grad_norm=self.grad_norm, max_norm=self.max_norm)
        return {**doc, "beta": self.beta}

    @classmethod
    def from_json(cls, doc: dict) -> AdamPrediction:
        _names(doc, ("moment", "grads"), ("grad_norm", "clip"))
        return cls(
            doc["moment"],
            doc["grads"],
            doc.get("grad_norm"),
            _number(doc["beta"]),
            None if doc.get("max_norm") is None else _number(doc["max_norm"]),
            doc.get("clip"),
        )

    def _clip(self, inputs: list[np.ndarray], rows: int) -> np.ndarray:
        """Each of ``rows`` rows' clip coefficient ``c`` (float32, one per row)."""
        f32 = np.float32
        if self.clip is not None:
            return np.asarray(inputs[1], f32)
        if self.max_norm is None:
            return np.ones(rows, f32)
        return _bf16(np.minimum(f32(1), f32(self.max_norm) / (_bf16(np.asarray(inputs[1], f32)) + f32(1e-6))))

    def _predict(self, prev: np.ndarray, grad: np.ndarray, clip: np.ndarray) -> np.ndarray:
        """float32 ``prev`` rows, their bfloat16 ``grad`` rows (or the uint16 bits) and clip
        coefficients -> the predicted rows' bfloat16 bits (uint16). Rows along the first axis; any
        number of them at once."""
        f32 = np.float32
        grad = grad.view(BFLOAT16) if grad.dtype == np.uint16 else grad
        g = _bf16(grad.astype(f32) * clip.reshape(-1, *(1,) * (grad.ndim - 1)))
        if self.moment == "exp_avg":
            pred = prev + f32(1 - self.beta) * (g - prev)
        else:
            pred = _bf16(prev * f32(self.beta)) + f32(1 - self.beta) * g * g
        return _bits(pred)

    def residuals(
        self, moment: np.ndarray, inputs: list[np.ndarray], axis: int = 0, in_place: bool = False
    ) -> np.ndarray:
        """int16 residuals of the moment rows along ``axis`` (the chunk's rows, from its first),
        given the same rows of :attr:`inputs`; ``in_place``: written over ``moment`` (C-ordered,
        rows first), which saves a tile of memory. Each row is predicted from the recorded row
        before it, so the rows are predicted all at once, ``ROWS_AT_ONCE`` at a time: a few numpy
        calls per chunk rather than per row (each call takes the GIL, which a training loop on a
        GPU needs)."""
        bits, grads = (np.ascontiguousarray(np.moveaxis(a, axis, 0)) for a in (moment.view(np.uint16), inputs[0]))
        out = bits if in_place else np.empty(bits.shape, np.uint16)
        clip = self._clip(inputs, len(bits))
        prev = np.zeros((min(ROWS_AT_ONCE, len(bits)), *bits.shape[1:]), np.float32)  # before the first row: zeros
        last = None  # the last row of the previous rows, as recorded
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            for a in range(0, len(bits), ROWS_AT_ONCE):
                b = min(a + ROWS_AT_ONCE, len(bits))
                if a:
                    prev[0] = last.view(BFLOAT16)
                prev[1 : b - a] = bits[a : b - 1].view(BFLOAT16)
                last = bits[b - 1].copy()  # the next rows' first prediction needs it, as recorded
                np.subtract(bits[a:b], self._predict(prev[: b - a], grads[a:b], clip[a:b]), out=out[a:b])
        return np.ascontiguousarray(np.moveaxis(out, 0, axis)).view(np.int16)

    def rebuild(self, residuals: np.ndarray, inputs: list[np.ndarray], axis: int = 0) -> np.ndarray:
        """The moment rows' bfloat16 bits (uint16) from their residuals: :meth:`residuals` undone.
        Row by row, each predicted from the one just rebuilt. The walk runs on row-major copies: in
        a chunk's stored order each row is strided, and 5x slower to compute on. The result is
        C-ordered like ``residuals``."""
        rows, grads = (np.ascontiguousarray(np.moveaxis(a, axis, 0)) for a in (residuals.view(np.uint16), inputs[0]))
        clip = self._clip(inputs, len(rows))
        out = np.empty(rows.shape, np.uint16)
        prev = np.zeros((1, *rows.shape[1:]), np.float32)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            for r in range(rows.shape[0]):
                np.add(self._predict(prev, grads[r : r + 1], clip[r : r + 1])[0], rows[r], out=out[r])
                prev[0] = out[r].view(BFLOAT16)
        return np.ascontiguousarray(np.moveaxis(out, 0, axis))


@dataclass(frozen=True)
class AdamStepPrediction:
    """A parameter's rows (the archive profile's embeddings) stored as residuals of AdamW's step
    replayed: torch's ``_single_tensor_adam`` (decoupled weight decay) for a bfloat16 parameter,
    from the parameter's row before, this row's recorded moments (``exp_avg``, ``exp_avg_sq``:
    after the step), its learning rate and its training step (the optimizer's step count)::

        bc1  = 1 - beta1 ** step;  bc2 = 1 - beta2 ** step              # float64
        s    = f32(-(lr / bc1));   k = f32(sqrt(bc2));   d = f32(1 - lr * weight_decay)
        p    = bf16(prev * d)                                           # only when weight_decay != 0
        den  = bf16(bf16(bf16(sqrt(exp_avg_sq)) / k) + f32(eps))
        pred = bf16(p + (s * exp_avg) / den)

    The first line in float64 (``lr`` the row's float32 learning rate, ``beta ** step`` by squaring:
    :func:`_power`), the rest in float32, one rounding per operation, a NaN prediction taken as the
    bits 0x7FC0. Each bf16 is one of torch's bfloat16 operations (``sqrt``, the division by a
    Python float, ``add_(eps)``, ``addcdiv_``, whose ``value * t1 / t2`` is computed in that order).
    The first row of each main chunk has no row before it in the chunk: it is predicted as 0
    (stored as its own bits), so every chunk decodes on its own. On the seed run the other rows
    are predicted exactly for 99.8% (row 1) to 100.00% of their values.
    """

    exp_avg: str  # the bfloat16 kinds holding the moments after each step (same shape)
    exp_avg_sq: str
    learning_rate: str  # the 0-d float32 kind holding each step's learning rate
    steps: str  # the 0-d integer array holding each row's training step (the store's recorded_steps)
    beta1: float
    beta2: float
    eps: float
    weight_decay: float = 0.0

    NAME = "adamw_step"
    TENSORS = 2

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.exp_avg, self.exp_avg_sq, self.learning_rate, self.steps

    def to_json(self) -> dict:
        return {
            "name": self.NAME,
            "exp_avg": self.exp_avg,
            "exp_avg_sq": self.exp_avg_sq,
            "learning_rate": self.learning_rate,
            "steps": self.steps,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
        }

    @classmethod
    def from_json(cls, doc: dict) -> AdamStepPrediction:
        _names(doc, ("exp_avg", "exp_avg_sq", "learning_rate", "steps"))
        return cls(
            doc["exp_avg"],
            doc["exp_avg_sq"],
            doc["learning_rate"],
            doc["steps"],
            *(_number(doc[k]) for k in ("beta1", "beta2", "eps", "weight_decay")),
        )

    def _updates(self, inputs: list[np.ndarray], axis: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Per row (rows first): ``(s * exp_avg) / den`` as float32, and the weight-decay factor
        ``d`` (None without weight decay)."""
        f32 = np.float32
        m, v = (_float(np.moveaxis(a, axis, 0)) for a in inputs[:2])
        lr, steps = np.asarray(inputs[2], np.float64), inputs[3]
        rows = (len(m), *(1,) * (m.ndim - 1))
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            bc1 = np.array([1 - _power(self.beta1, int(n)) for n in steps])
            bc2 = np.array([1 - _power(self.beta2, int(n)) for n in steps])
            s = (-(lr / bc1)).astype(f32).reshape(rows)
            k = np.sqrt(bc2).astype(f32).reshape(rows)
            den = _bf16(_bf16(_bf16(np.sqrt(v)) / k) + f32(self.eps))
            decay = None if self.weight_decay == 0 else (1 - lr * self.weight_decay).astype(f32).reshape(rows)
            return (s * m) / den, decay

    def residuals(
        self, values: np.ndarray, inputs: list[np.ndarray], axis: int = 0, in_place: bool = False
    ) -> np.ndarray:
        """int16 residuals of the parameter rows along ``axis`` (a chunk's rows, from its first):
        every row predicted at once from the recorded row before it; ``in_place``: written over
        ``values``."""
        bits = np.moveaxis(values.view(np.uint16), axis, 0)
        update, decay = self._updates(inputs, axis)
        out = bits if in_place else bits.copy()  # the first row: predicted as 0
        with np.errstate(invalid="ignore", over="ignore"):
            prev = _float(bits[:-1])
            if decay is not None:
                prev = _bf16(prev * decay[1:])
            out[1:] -= _bits(prev + update[1:])
        return np.ascontiguousarray(np.moveaxis(out, 0, axis)).view(np.int16)

    def rebuild(self, residuals: np.ndarray, inputs: list[np.ndarray], axis: int = 0) -> np.ndarray:
        """The parameter rows' bfloat16 bits (uint16) from their residuals: :meth:`residuals` undone,
        row after row, each predicted from the one just rebuilt."""
        out = np.moveaxis(residuals.view(np.uint16), axis, 0).copy()  # C order, rows first
        update, decay = self._updates(inputs, axis)
        with np.errstate(invalid="ignore", over="ignore"):
            for r in range(1, len(out)):
                prev = _float(out[r - 1])
                if decay is not None:
                    prev = _bf16(prev * decay[r])
                out[r] += _bits(prev + update[r])
        return np.ascontiguousarray(np.moveaxis(out, 0, axis))


ROWS_AT_ONCE = 4  # rows :meth:`AdamPrediction.residuals` predicts at once (its float32 temporaries stay small)
CANONICAL_NAN = 0x7FC0  # the bfloat16 quiet NaN a NaN prediction is taken as
PREDICTIONS = {p.NAME: p for p in (AdamPrediction, AdamStepPrediction)}  # every prediction a store may name
Prediction = AdamPrediction | AdamStepPrediction


def prediction_from_json(doc) -> Prediction:
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


def _float(bits: np.ndarray) -> np.ndarray:
    """bfloat16 values (or their uint16 bits) as float32, exactly."""
    return bits.view(BFLOAT16).astype(np.float32) if bits.dtype == np.uint16 else bits.astype(np.float32)


def _bits(pred: np.ndarray) -> np.ndarray:
    """A float32 prediction rounded to bfloat16, as its bits (uint16); NaN as :data:`CANONICAL_NAN`
    (NaN payloads from arithmetic differ between machines)."""
    bits = pred.astype(BFLOAT16).view(np.uint16)
    bits[np.isnan(pred)] = CANONICAL_NAN
    return bits


def _power(base: float, n: int) -> float:
    """``base ** n`` in float64 by squaring (multiply in the base for each set bit of ``n``, lowest
    first, squaring it after each bit): one exactly defined result on every machine, which a
    platform's ``pow`` is not bound to give."""
    result = 1.0
    while n > 0:
        if n & 1:
            result *= base
        base *= base
        n >>= 1
    return result


def estimate_clip(prev: np.ndarray, moment: np.ndarray, grads: np.ndarray, beta: float, ulps: int = 2) -> float:
    """The clip coefficient of one step from a sample of it: ``prev`` and ``moment`` Adam's
    ``exp_avg`` before and after the step, ``grads`` the step's pre-clip gradient (bfloat16 arrays
    of one shape, e.g. some tokens of a row).

    ``exp_avg - beta * prev`` is about ``(1 - beta) * c * grads``: least squares give ``c``, which
    torch computes in bfloat16 (``clip_grad_norm_`` on bfloat16 gradients), so the bfloat16 values
    within ``ulps`` of it, and 1 (no clipping), are tried, and the one whose :class:`AdamPrediction`
    predicts the most of ``moment`` exactly is chosen (the nearest to the estimate among equals)."""
    f64 = np.float64
    p, m, g = (_float(np.asarray(a)).ravel().astype(f64) for a in (prev, moment, grads))
    scale = (1 - beta) * np.dot(g, g)
    estimate = float(np.dot(m - beta * p, g) / scale) if scale > 0 and np.isfinite(scale) else 1.0
    estimate = min(max(estimate, 0.0), 1.0) if math.isfinite(estimate) else 1.0
    nearest = int(np.float32(estimate).astype(BFLOAT16).view(np.uint16))
    candidates = {
        1.0,
        *(
            c
            for b in range(max(nearest - ulps, 0), nearest + ulps + 1)
            if (c := float(np.uint16(b).view(BFLOAT16))) <= 1.0
        ),
    }
    replay = AdamPrediction("exp_avg", "", None, beta)
    prev32, bits = _float(np.asarray(prev)), np.asarray(moment).view(np.uint16)
    with np.errstate(invalid="ignore", over="ignore"):
        exact = {
            c: int(np.count_nonzero(replay._predict(prev32, np.asarray(grads), np.float32(c)) == bits))
            for c in sorted(candidates)
        }
    return max(exact, key=lambda c: (exact[c], -abs(c - estimate)))


def adam_predictions(
    beta1: float,
    beta2: float,
    max_norm: float | None,
    grads: str = "grads",
    grad_norm: str | None = "grad_norm",
    clip: str | None = None,
) -> dict[str, AdamPrediction]:
    """The predictions of the seed kinds ``momentum`` and ``variance`` for an AdamW run with these
    betas and gradient clipping (``max_norm`` applied to the norms in ``grad_norm``; None for
    none; or each step's coefficient in the kind ``clip``, with ``grad_norm=None``), recorded
    every step.

    >>> wordystore.create(path, kinds, predictions=wordystore.adam_predictions(0.9, 0.999, 1.0))
    """
    return {
        "momentum": AdamPrediction("exp_avg", grads, grad_norm, beta1, max_norm, clip),
        "variance": AdamPrediction("exp_avg_sq", grads, grad_norm, beta2, max_norm, clip),
    }


def archive_predictions(
    moments: dict[str, AdamPrediction],
    eps: float,
    weight_decay: float = 0.0,
    learning_rate: str = "learning_rate",
    steps: str = "recorded_steps",
    parameter: str = "embeddings",
) -> dict[str, Prediction]:
    """The archive profile's predictions: the seed kinds' moment predictions ``moments`` (e.g.
    :func:`adam_predictions`), and the parameter ``embeddings`` replayed from them
    (:class:`AdamStepPrediction`, with the betas of ``moments``) with this ``eps`` and weight decay.

    >>> adam = wordystore.adam_predictions(0.9, 0.999, 1.0)
    >>> wordystore.create(path, kinds, profile="archive", predictions=wordystore.archive_predictions(adam, 1e-8))
    """
    betas = {p.moment: (name, p.beta) for name, p in moments.items()}
    if set(betas) != {"exp_avg", "exp_avg_sq"}:
        raise ValueError(f"the archive profile replays AdamW from both moments' predictions; got {sorted(moments)}")
    (exp_avg, beta1), (exp_avg_sq, beta2) = betas["exp_avg"], betas["exp_avg_sq"]
    step = AdamStepPrediction(exp_avg, exp_avg_sq, learning_rate, steps, beta1, beta2, eps, weight_decay)
    return {**moments, parameter: step}
