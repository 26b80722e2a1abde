"""bfloat16 as a zarr v3 data type.

zarr-python 3.1 ships no bfloat16. The zarr-extensions registry names the type ``"bfloat16"``
(little-endian bytes, the upper half of an IEEE float32), and readers such as tensorstore know it
under that name. Registering this class makes zarr-python read and write such arrays bit for bit,
with numpy's ``ml_dtypes.bfloat16`` as the in-memory type. Importing :mod:`wordystore` registers it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import ClassVar

import ml_dtypes
import numpy as np
from zarr.core.dtype import data_type_registry
from zarr.core.dtype.npy.float import BaseFloat

NUMPY_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
ZARR_NAME = "bfloat16"


@dataclass(frozen=True, kw_only=True)
class BFloat16(BaseFloat):
    """zarr data type ``"bfloat16"`` backed by ``ml_dtypes.bfloat16``."""

    dtype_cls = type(NUMPY_BFLOAT16)
    _zarr_v3_name: ClassVar[str] = ZARR_NAME
    _zarr_v2_names: ClassVar[tuple[str, ...]] = ()

    @property
    def item_size(self) -> int:
        return 2

    def to_native_dtype(self):
        return NUMPY_BFLOAT16

    @classmethod
    def from_native_dtype(cls, dtype):
        if cls._check_native_dtype(dtype):
            return cls(endianness="little")
        return super().from_native_dtype(dtype)


def register() -> None:
    """Make zarr-python know ``"bfloat16"`` (idempotent)."""
    if sys.byteorder != "little":  # ml_dtypes arrays are host-endian; the format is little-endian
        raise RuntimeError("wordystore's bfloat16 support needs a little-endian host")
    if ZARR_NAME not in data_type_registry.contents:
        data_type_registry.register(ZARR_NAME, BFloat16)


register()
