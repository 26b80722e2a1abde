"""bfloat16 for zarr-python: the data type, and the codec that hands its bits to pcodec.

zarr-python 3.1 ships no bfloat16. The zarr-extensions registry names the type ``"bfloat16"``
(little-endian bytes, the upper half of an IEEE float32), and readers such as tensorstore know it
under that name. Registering :class:`BFloat16` makes zarr-python read and write such arrays bit for
bit, with numpy's ``ml_dtypes.bfloat16`` as the in-memory type.

pcodec takes no bfloat16, so the compact profile compresses a bfloat16 array's uint16 bits through
the array-to-array codec ``wordystore.bf16_bits`` (:class:`BFloat16BitsCodec` here; wordystore's own
chain has its twin in :mod:`wordystore.format.codecs`): the array keeps its ``bfloat16`` data type, a
zarr reader with wordystore imported reads its true values, and one without fails on the unknown
codec rather than returning bits. Importing :mod:`wordystore` registers both.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import ClassVar

import ml_dtypes
import numpy as np
from zarr.abc.codec import ArrayArrayCodec
from zarr.core.dtype import UInt16, data_type_registry
from zarr.core.dtype.npy.float import BaseFloat
from zarr.registry import get_codec_class, register_codec

NUMPY_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
ZARR_NAME = "bfloat16"
BITS_CODEC = "wordystore.bf16_bits"


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


@dataclass(frozen=True)
class BFloat16BitsCodec(ArrayArrayCodec):
    """zarr codec ``wordystore.bf16_bits``: a bfloat16 chunk as its uint16 bits, no value changed."""

    is_fixed_size = True

    @classmethod
    def from_dict(cls, data: dict) -> BFloat16BitsCodec:
        return cls()

    def to_dict(self) -> dict:
        return {"name": BITS_CODEC}

    def resolve_metadata(self, chunk_spec):
        return replace(chunk_spec, dtype=UInt16(endianness="little"), fill_value=np.uint16(0))

    async def _decode_single(self, chunk_array, chunk_spec):
        return chunk_array.from_ndarray_like(chunk_array.as_ndarray_like().view(NUMPY_BFLOAT16))

    async def _encode_single(self, chunk_array, chunk_spec):
        return chunk_array.from_ndarray_like(chunk_array.as_ndarray_like().view(np.uint16))

    def compute_encoded_size(self, input_byte_length: int, chunk_spec) -> int:
        return input_byte_length


def register() -> None:
    """Make zarr-python know ``"bfloat16"`` and ``wordystore.bf16_bits`` (idempotent)."""
    if sys.byteorder != "little":  # ml_dtypes arrays are host-endian; the format is little-endian
        raise RuntimeError("wordystore's bfloat16 support needs a little-endian host")
    if ZARR_NAME not in data_type_registry.contents:
        data_type_registry.register(ZARR_NAME, BFloat16)
    try:
        get_codec_class(BITS_CODEC)
    except KeyError:
        register_codec(BITS_CODEC, BFloat16BitsCodec)


register()
