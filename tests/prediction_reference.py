"""The predictions of docs/format.md in numpy: the independent reference the library's torch
replays (``wordystore.format.prediction``) are checked against, bit for bit.

This was the library's own implementation before its replays moved to torch operations. Each
function takes the prediction (its fields: betas, clipping, eps...) and computes what the format
says, operation by operation, in numpy float32 (bfloat16 roundings through ``ml_dtypes``); the
float32 kinds' fused multiply-adds in float64, as the format defines them.
"""

import numpy as np

from wordystore.format.bfloat16 import NUMPY_BFLOAT16 as BFLOAT16
from wordystore.format.prediction import AdamPrediction, AdamStepPrediction, _power

f32 = np.float32
CANONICAL_NAN = {2: 0x7FC0, 4: 0x7FC00000}


def bf16(x) -> np.ndarray:
    """Round float32 to bfloat16 and back (nearest even)."""
    return np.asarray(x, f32).astype(BFLOAT16).astype(f32)


def values(a: np.ndarray) -> np.ndarray:
    """bfloat16 or float32 values (or their bits) as float32, exactly."""
    a = np.asarray(a)
    if a.dtype.itemsize == 2:
        return a.view(np.uint16).view(BFLOAT16).astype(f32)
    return a.view(np.uint32).view(f32).copy()


def to_bits(pred: np.ndarray, size: int) -> np.ndarray:
    """A float32 prediction rounded to the kind's dtype (item ``size``), as bits; NaN canonical."""
    bits = pred.astype(BFLOAT16).view(np.uint16) if size == 2 else pred.astype(f32).view(np.uint32).copy()
    bits[np.isnan(pred)] = CANONICAL_NAN[size]
    return bits


def fma(a, b, c) -> np.ndarray:
    """``a * b + c`` of float32 values: the product exact in float64, one rounding of the sum in
    float64, then to float32 (docs/format.md, float32 kinds)."""
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(f32)


def adam_clip(p: AdamPrediction, inputs, rows: int, size: int) -> np.ndarray:
    if p.clip is not None:
        return np.asarray(inputs[1], f32)
    if p.max_norm is None:
        return np.ones(rows, f32)
    norm = np.asarray(inputs[1], f32)
    if size == 2:
        return bf16(np.minimum(f32(1), f32(p.max_norm) / (bf16(norm) + f32(1e-6))))
    return np.minimum(f32(1), (f32(1) / (norm + f32(1e-6))) * f32(p.max_norm))


def adam_predict(p: AdamPrediction, prev: np.ndarray, grad: np.ndarray, clip: np.ndarray, size: int) -> np.ndarray:
    """float32 ``prev`` rows, their gradient rows, clip coefficients -> the predicted rows' bits."""
    w = f32(1 - p.beta)
    c = clip.reshape(-1, *(1,) * (grad.ndim - 1))
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        g = values(grad) * c
        if size == 2:
            g = bf16(g)
            if p.moment == "exp_avg":
                pred = prev + w * (g - prev)
            else:
                pred = bf16(prev * f32(p.beta)) + w * g * g
        elif p.moment == "exp_avg":
            pred = fma(w, g - prev, prev) if w < 0.5 else fma(w - f32(1), g - prev, g)
        else:
            pred = fma(w * g, g, prev * f32(p.beta))
    return to_bits(pred, size)


def adam_residuals(p: AdamPrediction, moment: np.ndarray, inputs) -> np.ndarray:
    """Residuals of a chunk's moment rows (rows first), each predicted from the recorded row before."""
    size = moment.dtype.itemsize
    bits = moment.view(f"u{size}")
    prev = np.concatenate([np.zeros((1, *bits.shape[1:]), f32), values(bits[:-1])])
    pred = adam_predict(p, prev, inputs[0], adam_clip(p, inputs, len(bits), size), size)
    return (bits - pred).view(f"i{size}")


def adam_rebuild(p: AdamPrediction, residuals: np.ndarray, inputs) -> np.ndarray:
    size = residuals.dtype.itemsize
    res = residuals.view(f"u{size}")
    clip = adam_clip(p, inputs, len(res), size)
    out = np.empty_like(res)
    prev = np.zeros((1, *res.shape[1:]), f32)
    for r in range(len(res)):
        out[r] = res[r] + adam_predict(p, prev, inputs[0][r : r + 1], clip[r : r + 1], size)[0]
        prev[0] = values(out[r])
    return out


def step_updates(p: AdamStepPrediction, inputs, size: int):
    """Per row (rows first): ``(s * m) / den`` as float32, and the weight-decay factor (or None)."""
    m, v = values(inputs[0]), values(inputs[1])
    lr, steps = np.asarray(inputs[2], np.float64), inputs[3]
    rows = (len(m), *(1,) * (m.ndim - 1))
    r = bf16 if size == 2 else (lambda x: np.asarray(x, f32))
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        bc1 = np.array([1 - _power(p.beta1, int(n)) for n in steps])
        bc2 = np.array([1 - _power(p.beta2, int(n)) for n in steps])
        s = (-(lr / bc1)).astype(f32).reshape(rows)
        k = np.sqrt(bc2).astype(f32).reshape(rows)
        den = r(r(r(np.sqrt(v)) / k) + f32(p.eps))
        decay = None if p.weight_decay == 0 else (1 - lr * p.weight_decay).astype(f32).reshape(rows)
        return (s * m) / den, decay


def step_predict(prev: np.ndarray, update: np.ndarray, decay, size: int) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        if decay is not None:
            prev = prev * decay
            prev = bf16(prev) if size == 2 else prev
        return to_bits(prev + update, size)


def step_residuals(p: AdamStepPrediction, param: np.ndarray, inputs) -> np.ndarray:
    size = param.dtype.itemsize
    bits = param.view(f"u{size}")
    update, decay = step_updates(p, inputs, size)
    out = bits.copy()
    out[1:] -= step_predict(values(bits[:-1]), update[1:], None if decay is None else decay[1:], size)
    return out.view(f"i{size}")


def step_rebuild(p: AdamStepPrediction, residuals: np.ndarray, inputs) -> np.ndarray:
    size = residuals.dtype.itemsize
    out = residuals.view(f"u{size}").copy()
    update, decay = step_updates(p, inputs, size)
    for r in range(1, len(out)):
        out[r] += step_predict(values(out[r - 1]), update[r], None if decay is None else decay[r], size)
    return out
