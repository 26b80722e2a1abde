"""Tensor kinds: what one step of a trajectory holds, declared when a store is created.

A kind has a name (``embeddings``), a per-step shape (``(50257, 64)``), a dtype name as zarr v3
spells it (``bfloat16``) and one dimension name per axis (``("token", "dim")``). The step axis is
added in front of every kind. The axis named ``token`` is the one token sets index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import torch

from wordystore.format.bfloat16 import NUMPY_BFLOAT16

# dtype name (zarr v3) -> (numpy dtype, torch dtype)
DTYPES: dict[str, tuple[np.dtype, torch.dtype]] = {
    "bfloat16": (NUMPY_BFLOAT16, torch.bfloat16),
    "float16": (np.dtype("float16"), torch.float16),
    "float32": (np.dtype("float32"), torch.float32),
    "float64": (np.dtype("float64"), torch.float64),
    "int8": (np.dtype("int8"), torch.int8),
    "int16": (np.dtype("int16"), torch.int16),
    "int32": (np.dtype("int32"), torch.int32),
    "int64": (np.dtype("int64"), torch.int64),
    "uint8": (np.dtype("uint8"), torch.uint8),
    "bool": (np.dtype("bool"), torch.bool),
}


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a zarr v3 ``data_type``: a kind's (bfloat16 as ``ml_dtypes.bfloat16``),
    or one an array stores a kind as (``uint16`` bits, ``int16`` residuals)."""
    return DTYPES[name][0] if name in DTYPES else np.dtype(name)


@dataclass(frozen=True)
class Kind:
    """One tensor kind recorded at every step."""

    shape: tuple[int, ...]
    dtype: str = "bfloat16"
    dims: tuple[str, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        if any(n < 0 for n in self.shape):
            raise ValueError(f"kind shape {self.shape} has a negative length")
        if self.dtype not in DTYPES:
            raise ValueError(f"kind dtype {self.dtype!r} is not supported; expected one of {sorted(DTYPES)}")
        dims = self.dims if self.dims is not None else tuple(f"dim_{i}" for i in range(len(self.shape)))
        object.__setattr__(self, "dims", tuple(dims))
        if len(self.dims) != len(self.shape) or "step" in self.dims or len(set(self.dims)) != len(self.dims):
            raise ValueError(
                f"kind dims {self.dims} must name each of the {len(self.shape)} per-step axes once, and not 'step'"
            )

    @property
    def numpy_dtype(self) -> np.dtype:
        return DTYPES[self.dtype][0]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][1]

    @property
    def step_nbytes(self) -> int:
        return math.prod(self.shape) * self.numpy_dtype.itemsize  # exact: a document's shape may be absurd

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype, "dims": list(self.dims)}

    @classmethod
    def from_json(cls, data: dict) -> Kind:
        """A kind from a document: a shape of counts, a dtype name, a name per axis (else ValueError)."""
        shape, dtype, dims = data["shape"], data["dtype"], data["dims"]
        if (
            not isinstance(shape, list)
            or not all(isinstance(n, int) and not isinstance(n, bool) for n in shape)
            or not isinstance(dtype, str)
            or not isinstance(dims, list)
            or not all(isinstance(d, str) for d in dims)
        ):
            raise ValueError(f"{data!r} is not a kind (shape: a list of ints, dtype: a name, dims: a list of names)")
        return cls(shape=tuple(shape), dtype=dtype, dims=tuple(dims))


def scalar_value(kind: Kind, value) -> np.ndarray:
    """A Python or numpy scalar as a 0-d array of ``kind``'s dtype, refusing values it cannot hold.

    Rounding to a float kind is fine (0.1 into bfloat16); overflowing to infinity (1e39 into
    float32) or losing an integer (2**40 into int32, 1.5 into int64) raises ValueError.

    >>> scalar_value(Kind((), "float32"), 0.5)
    array(0.5, dtype=float32)
    """
    if isinstance(value, (bool, np.bool_)) != (kind.dtype == "bool"):
        raise ValueError(
            f"a {kind.dtype} kind takes {'bools' if kind.dtype == 'bool' else 'numbers, not bools'}; got {value!r}"
        )
    number = value.item() if isinstance(value, np.generic) and value.dtype.kind in "biuf" else value
    want = kind.numpy_dtype
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            array = np.asarray(value, dtype=want)
    except (OverflowError, TypeError, ValueError):
        array = None
    if array is None or (want.kind in "iub" and array.item() != number):
        raise ValueError(f"{value!r} does not fit in {kind.dtype}")
    if want.kind not in "iub" and np.isfinite(float(number)) and not np.isfinite(array.astype(np.float64)):
        raise ValueError(
            f"{value!r} overflows {kind.dtype} (largest finite value {float(ml_dtypes.finfo(want).max):.4g})"
        )
    return array


def seed_kinds(vocab_size: int = 50257, hidden_dim: int = 64) -> dict[str, Kind]:
    """The kinds the seed notebook records, plus the per-step scalars wordystore's trainer adds."""
    matrix = Kind((vocab_size, hidden_dim), "bfloat16", ("token", "dim"))
    return {
        "embeddings": matrix,
        "grads": matrix,
        "momentum": matrix,
        "variance": matrix,
        "logits": Kind((vocab_size,), "bfloat16", ("token",)),
        "losses": Kind((), "bfloat16", ()),
        "learning_rate": Kind((), "float32", ()),
        "grad_norm": Kind((), "float32", ()),
        "grad_norm_clipped": Kind((), "float32", ()),
    }


def numpy_to_torch(array: np.ndarray) -> torch.Tensor:
    """A torch tensor over ``array`` in the same dtype (bfloat16 via a uint16 view: no copy, exact bits)."""
    if not array.flags.c_contiguous or any(stride < 0 for stride in array.strides):
        array = array.copy(order="C")  # torch takes neither negative strides nor gaps
    if array.dtype == NUMPY_BFLOAT16:
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def torch_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A numpy array of a CPU tensor's exact bits (bfloat16 as ``ml_dtypes.bfloat16``)."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.uint16).numpy().view(NUMPY_BFLOAT16)
    return tensor.numpy()
