"""Predicted kinds: a kind's main-tier rows stored as residuals against a replay of the optimizer
(docs/format.md, "Predicted kinds"). Pure computation, beside the codecs it feeds:
:class:`wordystore.read.reading.ChunkReader` rebuilds a chunk with ``rebuild``, compaction encodes one
with ``residuals``. The replays are torch operations on buffers allocated once a call, each on at
most :data:`GRAIN` values, so that it runs on the calling thread (a pool's) and releases the GIL;
``tests/prediction_reference.py`` holds the same replays in numpy, the tests' independent check.

- :class:`AdamPrediction` (``"adam"``): Adam's moments from the gradients and each step's clipping;
- :class:`AdamStepPrediction` (``"adamw_step"``): a parameter from its row before and this row's
  moments, AdamW's whole step replayed (the archive profile).

Every prediction names the arrays it reads (``inputs``): the same rows of kinds of the predicted
kind's shape, or of 0-d arrays (one value per row). It predicts a chunk's rows from its first row on,
so that every chunk decodes on its own, and stores ``(bits(row) - bits(prediction)) mod 2**16`` as
int16 (a bfloat16 kind) or ``mod 2**32`` as int32 (a float32 kind, :class:`Numbers`): lossless
whatever the prediction's quality.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

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
    prediction taken as the bits 0x7FC0. A float32 moment: without the bfloat16 roundings, the
    clip coefficient as ``clip_grad_norm_`` computes it on float32 and each update's last multiply
    and add fused, as torch's ``lerp_`` and ``addcmul_`` fuse them (docs/format.md). The
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

    def _clip(self, inputs: list[np.ndarray], rows: int, numbers: Numbers) -> torch.Tensor:
        """Each of ``rows`` rows' clip coefficient ``c`` (float32, a column: one per row)."""
        f32 = np.float32
        if self.clip is not None:
            clip = np.asarray(inputs[1], f32)
        elif self.max_norm is None:
            clip = np.ones(rows, f32)
        else:
            norm = np.asarray(inputs[1], f32)
            with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
                if numbers.rounds:
                    clip = _bf16(np.minimum(f32(1), f32(self.max_norm) / (_bf16(norm) + f32(1e-6))))
                else:  # as clip_grad_norm_ computes it: max_norm / t is t.reciprocal() * max_norm
                    clip = np.minimum(f32(1), (f32(1) / (norm + f32(1e-6))) * f32(self.max_norm))
        return torch.from_numpy(np.array(clip, f32).reshape(-1, 1))

    def _predict_into(self, prev: torch.Tensor, grad: torch.Tensor, clip: torch.Tensor, bits: torch.Tensor, buf):
        """Rows of float32 ``prev``, their ``grad`` (the kind's dtype) and clip coefficients (a
        column) -> the predicted rows' bits, written into ``bits`` (int16 or int32). Every
        operation on at most :data:`GRAIN` values, temporaries from ``buf``."""
        numbers, shape = Numbers.of(bits), prev.shape
        w = float(np.float32(1 - self.beta))
        g, t = buf.take("g", shape), buf.take("t", shape)
        torch.mul(grad, clip, out=g)  # the clipped gradient, in float32
        numbers.round(g, buf)
        if numbers.rounds:  # bfloat16: each operation rounded to float32 on its own
            if self.moment == "exp_avg":
                torch.sub(g, prev, out=t)
                t.mul_(w).add_(prev)
            else:
                torch.mul(prev, float(np.float32(self.beta)), out=t)
                numbers.round(t, buf)
                u = buf.take("u", shape)
                torch.mul(g, w, out=u).mul_(g)
                t.add_(u)
        else:  # float32: torch's lerp_ and addcmul_ kernels fuse the last multiply and add (float64, below)
            wide = buf.take("wide", shape, torch.float64)
            if self.moment == "exp_avg":
                torch.sub(g, prev, out=t)
                wide.copy_(t)
                small = w < 0.5  # lerp's two forms: prev + w * (g - prev), or g + (w - 1) * (g - prev)
                wide.mul_(w if small else float(np.float32(w) - np.float32(1))).add_(prev if small else g)
            else:
                torch.mul(prev, float(np.float32(self.beta)), out=t)
                torch.mul(g, w, out=buf.take("u", shape))
                wide.copy_(buf.take("u", shape)).mul_(g).add_(t)
            t.copy_(wide)
        numbers.bits_into(t, bits, buf)

    def _predicted(self, prev: np.ndarray, grads: np.ndarray, clip: float) -> np.ndarray:
        """One row's prediction (bits) from float32 ``prev``, its gradient row and clip coefficient."""
        numbers = Numbers.of(grads)
        bits = np.empty(grads.shape, numbers.bits)
        flat_prev, flat_grads, flat_bits = (a.reshape(1, -1) for a in (np.asarray(prev, np.float32), grads, bits))
        clip_column = torch.full((1, 1), float(np.float32(clip)))
        buf = _Buffers()
        for cols in _column_blocks(flat_bits.shape[1], 1):
            prev_t = torch.from_numpy(np.ascontiguousarray(flat_prev[:, cols]))
            grad_t = numbers.tensor(flat_grads[:, cols])
            self._predict_into(prev_t, grad_t, clip_column, numbers.tensor(flat_bits[:, cols], bits=True), buf)
        return bits

    def residuals(
        self, moment: np.ndarray, inputs: list[np.ndarray], axis: int = 0, in_place: bool = False
    ) -> np.ndarray:
        """Residuals (int16 for bfloat16, int32 for float32) of the moment rows along ``axis`` (the
        chunk's rows, from its first), given the same rows of :attr:`inputs`; ``in_place``: written
        over ``moment`` (C-ordered, rows first), which saves a tile of memory. Each row is predicted
        from the recorded row before it, so all rows are predicted at once, a block of columns at a
        time (torch operations on at most :data:`GRAIN` values each, which run on the calling
        thread and release the GIL)."""
        numbers = Numbers.of(moment)
        bits, grads = (_rows_first(a, axis) for a in (moment.view(numbers.bits), inputs[0]))
        out = bits if in_place else np.empty(bits.shape, numbers.bits)
        rows, columns = bits.shape
        clip = self._clip(inputs, rows, numbers)
        buf = _Buffers()
        for cols in _column_blocks(columns, rows):
            shape = (rows, cols.stop - cols.start)
            prev, pred = buf.take("prev", shape), buf.take("pred", shape, numbers.torch_bits)
            prev[0] = 0  # before the chunk's first row: zeros
            prev[1:] = numbers.tensor(bits[:-1, cols])
            self._predict_into(prev, numbers.tensor(grads[:, cols]), clip, pred, buf)
            np.subtract(bits[:, cols], pred.numpy().view(numbers.bits), out=out[:, cols])
        return _restore(out, moment, axis).view(numbers.residuals)

    def rebuild(self, residuals: np.ndarray, inputs: list[np.ndarray], axis: int = 0) -> np.ndarray:
        """The moment rows' bits (uint16 for bfloat16, uint32 for float32) from their residuals:
        :meth:`residuals` undone. Row by row, each predicted from the one just rebuilt. The walk runs
        on row-major copies: in a chunk's stored order each row is strided, and 5x slower to
        compute on. The result is C-ordered like ``residuals``."""
        numbers = Numbers.of(residuals)
        rows_in, grads = (_rows_first(a, axis) for a in (residuals.view(numbers.bits), inputs[0]))
        out = np.empty(rows_in.shape, numbers.bits)
        rows, columns = out.shape
        clip = self._clip(inputs, rows, numbers)
        buf = _Buffers()
        for cols in _column_blocks(columns, 1):
            shape = (1, cols.stop - cols.start)
            prev, pred = buf.take("prev", shape), buf.take("pred", shape, numbers.torch_bits)
            prev.zero_()
            for r in range(rows):
                self._predict_into(prev, numbers.tensor(grads[r : r + 1, cols]), clip[r : r + 1], pred, buf)
                np.add(rows_in[r : r + 1, cols], pred.numpy().view(numbers.bits), out=out[r : r + 1, cols])
                prev.copy_(numbers.tensor(out[r : r + 1, cols]))
        return _restore(out, residuals, axis)


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
    are predicted exactly for 99.8% (row 1) to 100.00% of their values. A float32 parameter: the
    same lines without the bfloat16 roundings (the square root is IEEE's, which torch's float32
    ``sqrt`` is not always: a few values then differ from torch's step, their residuals exact).
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

    def _scalars(self, inputs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per row, as float32 columns: the step size ``s``, ``k`` and the weight-decay factor ``d``
        (None without weight decay), from each row's learning rate and step in float64."""
        f32 = np.float32
        lr, steps = np.asarray(inputs[2], np.float64), inputs[3]
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            bc1 = np.array([1 - _power(self.beta1, int(n)) for n in steps])
            bc2 = np.array([1 - _power(self.beta2, int(n)) for n in steps])
            s = (-(lr / bc1)).astype(f32)
            k = np.sqrt(bc2).astype(f32)
            decay = None if self.weight_decay == 0 else (1 - lr * self.weight_decay).astype(f32)
        return tuple(None if a is None else torch.from_numpy(np.array(a, f32).reshape(-1, 1)) for a in (s, k, decay))

    def _predict_into(self, prev, m, v, scalars, bits: torch.Tensor, buf) -> None:
        """Rows of the float32 parameter ``prev`` before, this step's moments ``m`` and ``v`` (the
        kind's dtype) and their rows' ``(s, k, d)`` -> the predicted rows' bits, into ``bits``."""
        numbers, shape = Numbers.of(bits), prev.shape
        s, k, decay = scalars
        den, update = buf.take("den", shape), buf.take("update", shape)
        den.copy_(v)
        with np.errstate(invalid="ignore"):  # IEEE's square root: torch's float32 sqrt is not correctly rounded
            np.sqrt(den.numpy(), out=den.numpy())
        numbers.round(den, buf)
        den.div_(k)
        numbers.round(den, buf)
        den.add_(float(np.float32(self.eps)))
        numbers.round(den, buf)
        torch.mul(m, s, out=update).div_(den)
        if decay is not None:
            prev.mul_(decay)
            numbers.round(prev, buf)
        numbers.bits_into(prev.add_(update), bits, buf)

    def residuals(
        self, values: np.ndarray, inputs: list[np.ndarray], axis: int = 0, in_place: bool = False
    ) -> np.ndarray:
        """Residuals of the parameter rows along ``axis`` (a chunk's rows, from its first): every row
        predicted at once from the recorded row before it, a block of columns at a time;
        ``in_place``: written over ``values``."""
        numbers = Numbers.of(values)
        bits = _rows_first(values.view(numbers.bits), axis)
        m, v = (_rows_first(a, axis) for a in inputs[:2])
        out = bits if in_place else bits.copy()  # the first row: predicted as 0, its own bits
        rows, columns = bits.shape
        s, k, decay = self._scalars(inputs)
        later = (s[1:], k[1:], None if decay is None else decay[1:])
        buf = _Buffers()
        for cols in _column_blocks(columns, rows - 1):
            shape = (rows - 1, cols.stop - cols.start)
            prev, pred = buf.take("prev", shape), buf.take("pred", shape, numbers.torch_bits)
            prev.copy_(numbers.tensor(bits[:-1, cols]))
            self._predict_into(prev, numbers.tensor(m[1:, cols]), numbers.tensor(v[1:, cols]), later, pred, buf)
            np.subtract(bits[1:, cols], pred.numpy().view(numbers.bits), out=out[1:, cols])
        return _restore(out, values, axis).view(numbers.residuals)

    def rebuild(self, residuals: np.ndarray, inputs: list[np.ndarray], axis: int = 0) -> np.ndarray:
        """The parameter rows' bits from their residuals: :meth:`residuals` undone, row after row,
        each predicted from the one just rebuilt."""
        numbers = Numbers.of(residuals)
        out = _rows_first(residuals.view(numbers.bits), axis).copy()  # the first row: its own bits
        m, v = (_rows_first(a, axis) for a in inputs[:2])
        rows, columns = out.shape
        s, k, decay = self._scalars(inputs)
        buf = _Buffers()
        for cols in _column_blocks(columns, 1):
            shape = (1, cols.stop - cols.start)
            prev, pred = buf.take("prev", shape), buf.take("pred", shape, numbers.torch_bits)
            for r in range(1, rows):
                prev.copy_(numbers.tensor(out[r - 1 : r, cols]))
                row = (s[r : r + 1], k[r : r + 1], None if decay is None else decay[r : r + 1])
                self._predict_into(
                    prev, numbers.tensor(m[r : r + 1, cols]), numbers.tensor(v[r : r + 1, cols]), row, pred, buf
                )
                np.add(out[r : r + 1, cols], pred.numpy().view(numbers.bits), out=out[r : r + 1, cols])
        return _restore(out, residuals, axis)


GRAIN = 32768  # torch's grain (at::internal::GRAIN_SIZE): an operation on fewer values runs on the calling thread
PREDICTIONS = {p.NAME: p for p in (AdamPrediction, AdamStepPrediction)}  # every prediction a store may name
Prediction = AdamPrediction | AdamStepPrediction
RESIDUAL_DTYPES = {"bfloat16": "int16", "float32": "int32"}  # a predicted kind's dtype -> its residuals'


def prediction_from_json(doc) -> Prediction:
    """The prediction a document describes, by its ``name`` (``adam`` when it names none, as format 2's)."""
    if not isinstance(doc, dict):
        raise TypeError(f"a prediction is a JSON object, not {doc!r}")
    name = doc.get("name", AdamPrediction.NAME)
    if name not in PREDICTIONS:
        raise ValueError(f"prediction {name!r} is not one of {sorted(PREDICTIONS)}")
    return PREDICTIONS[name].from_json(doc)


@dataclass(frozen=True)
class Numbers:
    """The numbers of a predicted kind, bfloat16 or float32: how its values, bits and residuals
    are held, whether the replay rounds to bfloat16 after the operations the format names, and the
    quiet NaN a NaN prediction is taken as (NaN payloads from arithmetic differ between machines)."""

    torch_values: torch.dtype
    torch_bits: torch.dtype
    bits: np.dtype
    residuals: np.dtype
    canonical_nan: int
    rounds: bool

    @staticmethod
    def of(array) -> Numbers:
        """The numbers of an array of the kind's values, bits or residuals (numpy or torch), by item size."""
        size = array.itemsize if isinstance(array, torch.Tensor) else array.dtype.itemsize
        if size not in NUMBERS:
            raise ValueError(f"a predicted kind is bfloat16 or float32; got {array.dtype}")
        return NUMBERS[size]

    def tensor(self, array: np.ndarray, bits: bool = False) -> torch.Tensor:
        """A torch tensor over ``array``'s memory (values or bits of this item size), as values or as
        signed bits: no copy, exact bits."""
        signed = torch.from_numpy(array.view(self.residuals))
        return signed if bits else signed.view(self.torch_values)

    def round(self, values: torch.Tensor, buf: _Buffers) -> None:
        """Round float32 ``values`` in place as one operation of the kind's dtype would (bfloat16:
        to nearest, ties to even; float32: already)."""
        if self.rounds:
            narrow = buf.take("narrow", values.shape, self.torch_values)
            narrow.copy_(values)
            values.copy_(narrow)

    def bits_into(self, pred: torch.Tensor, bits: torch.Tensor, buf: _Buffers) -> None:
        """The float32 prediction ``pred`` rounded to the kind's dtype, as its bits, into ``bits``."""
        bits.view(self.torch_values).copy_(pred)
        nan = buf.take("nan", pred.shape, torch.bool)
        torch.ne(pred, pred, out=nan)
        bits.masked_fill_(nan, self.canonical_nan)


NUMBERS = {
    2: Numbers(torch.bfloat16, torch.int16, np.dtype(np.uint16), np.dtype(np.int16), 0x7FC0, True),
    4: Numbers(torch.float32, torch.int32, np.dtype(np.uint32), np.dtype(np.int32), 0x7FC00000, False),
}


class _Buffers:
    """A replay's temporaries, each allocated once per call at its first block's size (the widest:
    only the last block of columns is narrower) and viewed at each block's shape."""

    def __init__(self):
        self._flat = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        size = math.prod(shape)
        flat = self._flat.get(name)
        if flat is None or len(flat) < size:
            flat = self._flat[name] = torch.empty(size, dtype=dtype)
        return flat[:size].view(shape)


def _column_blocks(columns: int, rows: int) -> list[slice]:
    """Blocks of columns of ``rows`` rows, each of at most :data:`GRAIN` values (at least one column)."""
    width = max(1, GRAIN // max(rows, 1))
    return [slice(a, min(a + width, columns)) for a in range(0, columns, width)]


def _rows_first(array: np.ndarray, axis: int) -> np.ndarray:
    """``array``'s rows along ``axis`` as a C-ordered 2-d array (rows, values of a row); ``array``
    itself, not a copy, when it is already so (residuals computed in place)."""
    rows = np.ascontiguousarray(np.moveaxis(array, axis, 0))
    return rows.reshape(rows.shape[0], math.prod(rows.shape[1:]))


def _restore(rows: np.ndarray, like: np.ndarray, axis: int) -> np.ndarray:
    """2-d ``rows`` (from :func:`_rows_first`) back in ``like``'s shape, its rows along ``axis``, C-ordered."""
    moved = np.moveaxis(like, axis, 0).shape
    return np.ascontiguousarray(np.moveaxis(rows.reshape(moved), 0, axis))


def _bf16(x) -> np.ndarray:
    """Round float32 to bfloat16 and back (nearest even): one bfloat16 operation's rounding (the
    per-row clip coefficients)."""
    return np.asarray(x, np.float32).astype(BFLOAT16).astype(np.float32)


def _float(bits: np.ndarray) -> np.ndarray:
    """bfloat16 values (or their uint16 bits) as float32, exactly."""
    return bits.view(BFLOAT16).astype(np.float32) if bits.dtype == np.uint16 else bits.astype(np.float32)


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
    exact = {
        c: int(np.count_nonzero(replay._predicted(prev32, np.asarray(grads), c) == bits)) for c in sorted(candidates)
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
