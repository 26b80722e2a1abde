"""The zarr v3 codecs a wordystore array uses, as small typed classes.

Each class knows its zarr v3 JSON (``to_dict``/``from_dict``, the names and configuration keys
zarr-python, tensorstore and zarrs write) and how to run itself on numpy data. A
:class:`ChunkCodecs` chain encodes one inner chunk to bytes and decodes bytes straight into a
caller's buffer; :func:`encode_shard` and :class:`ShardIndex` implement zarr's ``sharding_indexed``
container (index at the end, ``bytes`` + ``crc32c`` index codecs).

Only the codecs below are understood; a store naming any other is refused with a clear error.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import crc32c as _crc32c
import numcodecs
import numpy as np

from wordystore.errors import CorruptChunkError, FormatError

EMPTY = 2**64 - 1  # a shard index entry (offset, nbytes) of an absent inner chunk: both all ones


@dataclass(frozen=True)
class Transpose:
    """Array -> array: permute the chunk's axes (``order[i]`` is the source axis of axis ``i``)."""

    order: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"name": "transpose", "configuration": {"order": list(self.order)}}

    @classmethod
    def from_dict(cls, data: dict) -> "Transpose":
        return cls(tuple(data["configuration"]["order"]))

    def stored_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape[i] for i in self.order)

    def to_logical(self, stored: np.ndarray) -> np.ndarray:
        """A view of a chunk in stored (transposed) order with the array's own axis order."""
        return stored.transpose(np.argsort(self.order))


@dataclass(frozen=True)
class Bytes:
    """Array -> bytes: the raw little-endian bytes of the chunk in C order."""

    def to_dict(self) -> dict:
        return {"name": "bytes", "configuration": {"endian": "little"}}

    @classmethod
    def from_dict(cls, data: dict) -> "Bytes":
        if data.get("configuration", {}).get("endian", "little") != "little":
            raise FormatError("only little-endian 'bytes' codecs are supported")
        return cls()

    def encode(self, chunk: np.ndarray) -> np.ndarray:
        """The chunk's bytes as a flat uint8 array (no ``tobytes``: that copy would hold the GIL)."""
        return np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)

    def decode_into(self, data, out: np.ndarray) -> None:
        out.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, np.uint8)


@dataclass(frozen=True)
class PCodec:
    """Array -> bytes: pcodec's standalone format (zarr name ``numcodecs.pcodec``).

    pcodec takes 16-, 32- and 64-bit numbers; bfloat16 chunks are passed as their uint16 bits
    (the array's ``data_type`` is then ``uint16``: see docs/format.md, "bfloat16 as uint16").
    """

    level: int = 8

    def to_dict(self) -> dict:
        return {"name": "numcodecs.pcodec", "configuration": {"level": self.level}}

    @classmethod
    def from_dict(cls, data: dict) -> "PCodec":
        config = dict(data.get("configuration", {}))
        defaults = {"mode_spec": "auto", "delta_spec": "auto", "paging_spec": "equal_pages_up_to"}
        unusual = {k: v for k, v in config.items() if k in defaults and v != defaults[k]}
        if unusual:  # decoding never needs them, but a writer must not silently change them
            raise FormatError(f"numcodecs.pcodec with {unusual} is not a wordystore codec")
        return cls(int(config.get("level", 8)))

    def encode(self, chunk: np.ndarray) -> bytes:
        from pcodec import ChunkConfig, standalone

        return standalone.simple_compress(np.ascontiguousarray(chunk).reshape(-1), ChunkConfig(compression_level=self.level))

    def decode_into(self, data, out: np.ndarray) -> None:
        from pcodec import standalone

        standalone.simple_decompress_into(bytes(data), out.reshape(-1))


@dataclass(frozen=True)
class Blosc:
    """Bytes -> bytes: blosc 1 (``cname``, ``clevel``, ``shuffle`` of ``typesize``-byte items)."""

    cname: str
    clevel: int
    shuffle: str  # "noshuffle" | "shuffle" | "bitshuffle"
    typesize: int

    _SHUFFLES = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE,
                 "bitshuffle": numcodecs.Blosc.BITSHUFFLE}

    def to_dict(self) -> dict:
        return {"name": "blosc", "configuration": {"typesize": self.typesize, "cname": self.cname,
                                                   "clevel": self.clevel, "shuffle": self.shuffle, "blocksize": 0}}

    @classmethod
    def from_dict(cls, data: dict) -> "Blosc":
        c = data["configuration"]
        return cls(c["cname"], int(c["clevel"]), c["shuffle"], int(c.get("typesize", 1)))

    def _codec(self) -> numcodecs.Blosc:
        return numcodecs.Blosc(self.cname, self.clevel, self._SHUFFLES[self.shuffle], 0)

    def encode(self, data: bytes) -> bytes:
        # numcodecs takes the item size from the buffer: hand it typesize-wide items
        items = np.frombuffer(data, dtype=f"V{self.typesize}" if self.typesize > 1 else np.uint8)
        return self._codec().encode(items)

    def decode(self, data, out=None) -> bytes:
        """The decompressed bytes; with ``out`` (a writable buffer of their size), written there."""
        return self._codec().decode(data, out=out)


@dataclass(frozen=True)
class Crc32c:
    """Bytes -> bytes: appends the CRC-32C of the data as 4 little-endian bytes."""

    def to_dict(self) -> dict:
        return {"name": "crc32c"}

    @classmethod
    def from_dict(cls, data: dict) -> "Crc32c":
        return cls()

    def encode(self, data) -> bytes:
        return bytes(data) + self.checksum(data)

    @staticmethod
    def checksum(*pieces) -> bytes:
        """The 4 bytes :meth:`encode` appends to the concatenation of ``pieces``."""
        value = 0
        for piece in pieces:
            value = _crc32c.crc32c(piece, value)
        return struct.pack("<I", value)

    def decode(self, data) -> memoryview:
        data = memoryview(data)
        if len(data) < 4 or struct.unpack("<I", data[-4:])[0] != _crc32c.crc32c(data[:-4]):
            raise CorruptChunkError("crc32c checksum mismatch")
        return data[:-4]


ARRAY_TO_ARRAY = {"transpose": Transpose}
ARRAY_TO_BYTES = {"bytes": Bytes, "numcodecs.pcodec": PCodec}
BYTES_TO_BYTES = {"blosc": Blosc, "crc32c": Crc32c}


@dataclass(frozen=True)
class ChunkCodecs:
    """The codec chain of one inner chunk: an optional transpose, a serializer, byte codecs."""

    transpose: Transpose | None
    serializer: Bytes | PCodec
    compressors: tuple[Blosc | Crc32c, ...]

    def to_list(self) -> list[dict]:
        first = [self.transpose.to_dict()] if self.transpose else []
        return first + [self.serializer.to_dict()] + [c.to_dict() for c in self.compressors]

    @classmethod
    def from_list(cls, codecs: list[dict]) -> "ChunkCodecs":
        names = [c.get("name") for c in codecs]
        known = {**ARRAY_TO_ARRAY, **ARRAY_TO_BYTES, **BYTES_TO_BYTES}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise FormatError(f"codecs {unknown} are not among wordystore's {sorted(known)}")
        transpose = None
        rest = list(codecs)
        if rest and rest[0]["name"] in ARRAY_TO_ARRAY:
            transpose = Transpose.from_dict(rest.pop(0))
        if not rest or rest[0]["name"] not in ARRAY_TO_BYTES:
            raise FormatError(f"codec chain {names} lacks a serializer (bytes or numcodecs.pcodec)")
        serializer = ARRAY_TO_BYTES[rest[0]["name"]].from_dict(rest.pop(0))
        if any(c["name"] not in BYTES_TO_BYTES for c in rest):
            raise FormatError(f"codec chain {names}: only bytes-to-bytes codecs may follow the serializer")
        return cls(transpose, serializer, tuple(BYTES_TO_BYTES[c["name"]].from_dict(c) for c in rest))

    def stored_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the chunk as serialized (after the transpose)."""
        return self.transpose.stored_shape(shape) if self.transpose else tuple(shape)

    def encode(self, chunk: np.ndarray) -> list:
        """The encoded chunk as buffers to lay end to end: a checksum comes as a 4-byte piece of its
        own, since appending it to the data would copy the chunk while holding the GIL."""
        if self.transpose:
            chunk = chunk.transpose(self.transpose.order)
        pieces = [self.serializer.encode(chunk)]
        for codec in self.compressors:
            if isinstance(codec, Crc32c):
                pieces.append(codec.checksum(*pieces))
            else:
                pieces = [codec.encode(pieces[0] if len(pieces) == 1 else b"".join(pieces))]
        return pieces

    def decode_into(self, data, stored: np.ndarray) -> np.ndarray:
        """Decode into ``stored`` (a C-contiguous buffer of :meth:`stored_shape`); returns a view
        of it in the array's axis order."""
        if not stored.flags.c_contiguous:  # reshape(-1) would decode into a copy, silently
            raise ValueError("decode_into needs a C-contiguous buffer")
        compressors = list(self.compressors)
        while compressors and isinstance(compressors[-1], Crc32c):
            data = compressors.pop().decode(data)
        if isinstance(self.serializer, Bytes) and len(compressors) == 1:  # blosc decompresses in place
            compressors[0].decode(data, out=stored.reshape(-1).view(np.uint8))
        else:
            for codec in reversed(compressors):
                data = codec.decode(data)
            self.serializer.decode_into(data, stored)
        return self.transpose.to_logical(stored) if self.transpose else stored


@dataclass(frozen=True)
class ShardIndex:
    """The index at the end of a ``sharding_indexed`` shard, as zarr-python's sharding codec keeps its
    ``_ShardIndex``: per inner chunk (C order of the shard's chunk grid) its (offset, nbytes) in the
    shard as two little-endian uint64, both :data:`EMPTY` for an absent chunk; then the CRC-32C of
    that table (the index codecs ``bytes`` + ``crc32c``)."""

    table: np.ndarray  # [chunks, 2] uint64: (offset, nbytes)

    @staticmethod
    def nbytes(n_chunks: int) -> int:
        """Bytes of the index of a shard of ``n_chunks`` inner chunks: the table and its checksum."""
        return 16 * n_chunks + 4

    @classmethod
    def of_sizes(cls, sizes: list[int | None]) -> "ShardIndex":
        """The index of chunks of these sizes laid end to end from offset 0 (None: an absent chunk)."""
        table, offset = [], 0
        for size in sizes:
            table.append((EMPTY, EMPTY) if size is None else (offset, size))
            offset += size or 0
        return cls(np.asarray(table, dtype="<u8").reshape(len(sizes), 2))

    @classmethod
    def decode(cls, tail, n_chunks: int) -> "ShardIndex":
        """The index from a shard's last :meth:`nbytes` bytes; CorruptChunkError if they do not check."""
        if len(tail) != cls.nbytes(n_chunks):
            raise CorruptChunkError(f"shard index is {len(tail)} bytes; expected {cls.nbytes(n_chunks)}")
        return cls(np.frombuffer(Crc32c().decode(tail), dtype="<u8").reshape(n_chunks, 2))

    def encode(self) -> bytes:
        return Crc32c().encode(np.asarray(self.table, dtype="<u8").tobytes())

    def span(self, chunk: int) -> tuple[int, int] | None:
        """Bytes ``[start, end)`` of inner chunk ``chunk`` in the shard; None if the chunk is absent."""
        offset, nbytes = (int(n) for n in self.table[chunk])
        return None if offset == EMPTY else (offset, offset + nbytes)


def encode_shard(chunks: list[list | None]) -> np.ndarray:
    """A ``sharding_indexed`` shard as a uint8 array: the inner chunks (C order of the shard's chunk
    grid; each as :meth:`ChunkCodecs.encode`'s pieces, None for an absent one), then their
    :class:`ShardIndex`. The pieces are copied in by numpy, which releases the GIL (``b"".join``
    would hold it for every byte)."""
    pieces = [[np.frombuffer(piece, np.uint8) for piece in chunk] for chunk in chunks if chunk is not None]
    sizes = [None if chunk is None else sum(len(piece) for piece in chunk) for chunk in chunks]
    index = ShardIndex.of_sizes(sizes).encode()
    shard = np.empty(sum(size or 0 for size in sizes) + len(index), np.uint8)
    offset = 0
    for piece in (piece for chunk in pieces for piece in chunk):
        shard[offset : offset + len(piece)] = piece
        offset += len(piece)
    shard[offset:] = np.frombuffer(index, np.uint8)
    return shard


# The raw (offset, nbytes) table, for tools that patch a shard's bytes (tests/test_faults.py).
shard_index_nbytes = ShardIndex.nbytes


def decode_shard_index(tail, n_chunks: int) -> np.ndarray:
    """The [n_chunks, 2] (offset, nbytes) table of a shard's index (see :class:`ShardIndex`)."""
    return ShardIndex.decode(tail, n_chunks).table
