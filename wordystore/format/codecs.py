"""The zarr v3 codecs a wordystore array uses, as small typed classes, and the shard container.

Each class knows its zarr v3 JSON (``to_dict``/``from_dict``, the names and configuration keys
zarr-python, tensorstore and zarrs write) and how to run itself on numpy data. A
:class:`ChunkCodecs` chain encodes one inner chunk to bytes and decodes bytes straight into a
caller's buffer; :func:`encode_shard` and :class:`ShardTail` implement zarr's ``sharding_indexed``
container (index at the end, ``bytes`` + ``crc32c`` index codecs) with, from format 3, a
:class:`BindingRecord` before the index that binds the shard to its store and key, and from format
4 to the digest of what decodes it (docs/format.md, "Binding"): zarr readers fetch the index and
the chunks it lists, and never read the record.

Only the codecs below are understood; a store naming any other is refused with a clear error.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from dataclasses import dataclass

import crc32c as _crc32c
import numcodecs
import numpy as np

from wordystore.errors import CorruptChunkError, FormatError
from wordystore.format.bfloat16 import BITS_CODEC, NUMPY_BFLOAT16

EMPTY = 2**64 - 1  # a shard index entry (offset, nbytes) of an absent inner chunk: both all ones


@dataclass(frozen=True)
class Transpose:
    """Array -> array: permute the chunk's axes (``order[i]`` is the source axis of axis ``i``)."""

    order: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"name": "transpose", "configuration": {"order": list(self.order)}}

    @classmethod
    def from_dict(cls, data: dict) -> Transpose:
        return cls(tuple(data["configuration"]["order"]))

    def stored_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape[i] for i in self.order)

    @functools.cached_property
    def inverse(self) -> tuple[int, ...]:
        """The permutation back to the array's own axis order (worked out once, not per chunk)."""
        return tuple(int(i) for i in np.argsort(self.order))

    def to_logical(self, stored: np.ndarray) -> np.ndarray:
        """A view of a chunk in stored (transposed) order with the array's own axis order."""
        return stored.transpose(self.inverse)


@dataclass(frozen=True)
class BFloat16Bits:
    """Array -> array: a bfloat16 chunk as its uint16 bits (zarr name ``wordystore.bf16_bits``), so
    that pcodec, which takes no bfloat16, compresses it while the array keeps the ``bfloat16`` data
    type. ``import wordystore`` registers the same codec with zarr-python
    (:mod:`wordystore.format.bfloat16`); a zarr reader without it fails on the unknown codec instead of
    returning bits."""

    def to_dict(self) -> dict:
        return {"name": BITS_CODEC}

    @classmethod
    def from_dict(cls, data: dict) -> BFloat16Bits:
        return cls()

    @staticmethod
    def bits(chunk: np.ndarray) -> np.ndarray:
        """The uint16 view a bfloat16 chunk is encoded (and decoded) as."""
        if chunk.dtype != NUMPY_BFLOAT16:
            raise FormatError(f"{BITS_CODEC} applies to bfloat16 arrays only, not {chunk.dtype}")
        return chunk.view(np.uint16)


@dataclass(frozen=True)
class Bytes:
    """Array -> bytes: the raw little-endian bytes of the chunk in C order."""

    def to_dict(self) -> dict:
        return {"name": "bytes", "configuration": {"endian": "little"}}

    @classmethod
    def from_dict(cls, data: dict) -> Bytes:
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
    (:class:`BFloat16Bits` before it in the chain; format 2 stored such arrays as ``uint16``).
    ``pages`` (numcodecs' ``equal_pages_up_to``; pcodec's default 262,144 when None) cuts the
    numbers into pages of at most that many, which the standalone format writes as chunks, each
    with its own statistics: the archive profile's residuals, one row a page, so that a chunk's
    first row (its own values) and its other rows (mostly zeros) do not share one distribution.
    """

    level: int = 8
    pages: int | None = None

    def to_dict(self) -> dict:
        pages = {} if self.pages is None else {"equal_pages_up_to": self.pages}
        return {"name": "numcodecs.pcodec", "configuration": {"level": self.level, **pages}}

    @classmethod
    def from_dict(cls, data: dict) -> PCodec:
        config = dict(data.get("configuration", {}))
        defaults = {"mode_spec": "auto", "delta_spec": "auto", "paging_spec": "equal_pages_up_to"}
        unusual = {k: v for k, v in config.items() if k in defaults and v != defaults[k]}
        if unusual:  # decoding never needs them, but a writer must not silently change them
            raise FormatError(f"numcodecs.pcodec with {unusual} is not a wordystore codec")
        pages = config.get("equal_pages_up_to")
        if pages is not None and not (isinstance(pages, int) and not isinstance(pages, bool) and pages > 0):
            raise FormatError(f"numcodecs.pcodec with equal_pages_up_to {pages!r} is not a wordystore codec")
        return cls(int(config.get("level", 8)), pages)

    def encode(self, chunk: np.ndarray) -> bytes:
        from pcodec import ChunkConfig, PagingSpec, standalone

        config = ChunkConfig(compression_level=self.level)
        if self.pages is not None:
            config = ChunkConfig(compression_level=self.level, paging_spec=PagingSpec.equal_pages_up_to(self.pages))
        return standalone.simple_compress(np.ascontiguousarray(chunk).reshape(-1), config)

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

    _SHUFFLES = {
        "noshuffle": numcodecs.Blosc.NOSHUFFLE,
        "shuffle": numcodecs.Blosc.SHUFFLE,
        "bitshuffle": numcodecs.Blosc.BITSHUFFLE,
    }

    def to_dict(self) -> dict:
        return {
            "name": "blosc",
            "configuration": {
                "typesize": self.typesize,
                "cname": self.cname,
                "clevel": self.clevel,
                "shuffle": self.shuffle,
                "blocksize": 0,
            },
        }

    @classmethod
    def from_dict(cls, data: dict) -> Blosc:
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
    def from_dict(cls, data: dict) -> Crc32c:
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


ARRAY_TO_ARRAY = {"transpose": Transpose, BITS_CODEC: BFloat16Bits}
ARRAY_TO_BYTES = {"bytes": Bytes, "numcodecs.pcodec": PCodec}
BYTES_TO_BYTES = {"blosc": Blosc, "crc32c": Crc32c}


@dataclass(frozen=True)
class ChunkCodecs:
    """The codec chain of one inner chunk: an optional transpose, optionally bfloat16 as its bits,
    a serializer, byte codecs."""

    transpose: Transpose | None
    serializer: Bytes | PCodec
    compressors: tuple[Blosc | Crc32c, ...]
    bits: BFloat16Bits | None = None

    def to_list(self) -> list[dict]:
        first = [c.to_dict() for c in (self.transpose, self.bits) if c]
        return first + [self.serializer.to_dict()] + [c.to_dict() for c in self.compressors]

    @classmethod
    def from_list(cls, codecs: list[dict]) -> ChunkCodecs:
        if not isinstance(codecs, list) or not all(isinstance(c, dict) for c in codecs):
            raise FormatError(f"a codec chain is a list of codecs, not {codecs!r}")
        names = [c.get("name") for c in codecs]
        known = {**ARRAY_TO_ARRAY, **ARRAY_TO_BYTES, **BYTES_TO_BYTES}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise FormatError(f"codecs {unknown} are not among wordystore's {sorted(known)}")
        rest = list(codecs)
        transpose = Transpose.from_dict(rest.pop(0)) if rest and rest[0]["name"] == "transpose" else None
        bits = BFloat16Bits.from_dict(rest.pop(0)) if rest and rest[0]["name"] == BITS_CODEC else None
        if not rest or rest[0]["name"] not in ARRAY_TO_BYTES:
            raise FormatError(f"codec chain {names} is not [transpose?, {BITS_CODEC}?, serializer, byte codecs...]")
        serializer = ARRAY_TO_BYTES[rest[0]["name"]].from_dict(rest.pop(0))
        if any(c["name"] not in BYTES_TO_BYTES for c in rest):
            raise FormatError(f"codec chain {names}: only bytes-to-bytes codecs may follow the serializer")
        return cls(transpose, serializer, tuple(BYTES_TO_BYTES[c["name"]].from_dict(c) for c in rest), bits)

    def stored_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the chunk as serialized (after the transpose)."""
        return self.transpose.stored_shape(shape) if self.transpose else tuple(shape)

    def encode(self, chunk: np.ndarray) -> list:
        """The encoded chunk as buffers to lay end to end: a checksum comes as a 4-byte piece of its
        own, since appending it to the data would copy the chunk while holding the GIL."""
        if self.transpose:
            chunk = chunk.transpose(self.transpose.order)
        if self.bits:
            chunk = self.bits.bits(chunk)
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
            self.serializer.decode_into(data, self.bits.bits(stored) if self.bits else stored)
        return self.transpose.to_logical(stored) if self.transpose else stored


def chunk_checksum(chunk) -> int:
    """The checksum a binding record lists for an encoded inner chunk: the CRC-32C of its bytes but
    the last four, which every wordystore chunk ends with (its ``crc32c`` codec's), so a reader
    compares those four bytes (the CRC-32C of a chunk *with* its own CRC appended is one constant
    for every chunk, and would bind nothing)."""
    return struct.unpack("<I", bytes(chunk[-4:]))[0] if len(chunk) >= 4 else _crc32c.crc32c(bytes(chunk))


def canonical_bytes(value) -> bytes:
    """The bytes a JSON value is digested as (docs/format.md, "Binding"): a type byte, then the
    value, little endian. Every number is an IEEE 754 binary64 (``1`` and ``1.0`` digest alike),
    members of an object go in the order of their keys' UTF-8 bytes::

        null  b"n"        false, true  b"f", b"t"        number  b"d" + binary64
        string  b"s" + u32 byte length + UTF-8           array  b"a" + u32 count + each item
        object  b"o" + u32 count + per member: its key (as a string), its value
    """
    if value is None:
        return b"n"
    if isinstance(value, bool):
        return b"t" if value else b"f"
    if isinstance(value, (int, float)):
        return b"d" + struct.pack("<d", value)
    if isinstance(value, str):
        data = value.encode()
        return b"s" + struct.pack("<I", len(data)) + data
    if isinstance(value, (list, tuple)):
        return b"a" + struct.pack("<I", len(value)) + b"".join(canonical_bytes(v) for v in value)
    if isinstance(value, dict):
        members = sorted(value.items(), key=lambda item: item[0].encode())
        return (
            b"o"
            + struct.pack("<I", len(members))
            + b"".join(canonical_bytes(k) + canonical_bytes(v) for k, v in members)
        )
    raise TypeError(f"{type(value).__name__} is not a JSON value")


def decoding_digest(description: dict) -> bytes:
    """The 16 bytes a format-4 binding record holds for what decodes its shard: SHA-256 of the
    :func:`canonical_bytes` of ``description`` (:attr:`wordystore.format.layout.ArrayLayout.decoding`)."""
    return hashlib.sha256(canonical_bytes(description)).digest()[:16]


@dataclass(frozen=True)
class BindingRecord:
    """What binds a format-3 or format-4 shard to its place (docs/format.md, "Binding"): stored
    just before the shard's index, where no zarr reader looks (the index lists every chunk's
    bytes). Little endian::

        magic       8 bytes   b"WYSTBIND"
        place       16 bytes  SHA-256(store_id, 0x00, shard key)[:16], both UTF-8
        decoding    16 bytes  format 4 only: decoding_digest() of what decodes the shard
        rows        u64       rows of the shard holding written data, from its first row
        checksums   u32 each  per inner chunk (the index's order): chunk_checksum(), 0 if absent
        crc32c      u32       of all the bytes above
    """

    place: bytes
    rows: int
    checksums: tuple[int, ...]
    decoding: bytes | None = None  # None in format 3, which does not bind them

    MAGIC = b"WYSTBIND"

    @staticmethod
    def nbytes(n_chunks: int, decoding: bool = False) -> int:
        return 36 + 16 * decoding + 4 * n_chunks

    def encode(self) -> bytes:
        body = self.MAGIC + self.place + (self.decoding or b"")
        return Crc32c().encode(body + struct.pack(f"<Q{len(self.checksums)}I", self.rows, *self.checksums))

    @classmethod
    def decode(cls, data, n_chunks: int, decoding: bool = False) -> BindingRecord:
        """The record from its :meth:`nbytes` bytes (``decoding``: with the digest of format 4);
        CorruptChunkError if they are not one."""
        if len(data) != cls.nbytes(n_chunks, decoding) or bytes(data[:8]) != cls.MAGIC:
            raise CorruptChunkError("it has no binding record (a format-3 or 4 shard has one before its index)")
        try:
            body = Crc32c().decode(data)
        except CorruptChunkError:
            raise CorruptChunkError("its binding record fails its crc32c checksum") from None
        fixed = 40 if decoding else 24
        rows, *checksums = struct.unpack(f"<Q{n_chunks}I", body[fixed:])
        return cls(bytes(body[8:24]), rows, tuple(checksums), bytes(body[24:40]) if decoding else None)


@dataclass(frozen=True)
class ShardBinding:
    """The store a bound shard belongs to (its ``store_id``): where each shard key's
    :class:`BindingRecord` comes from; ``decoding`` (format 4): the records bind the digest of what
    decodes their shard too."""

    store_id: str
    decoding: bool = False

    def place(self, key: str) -> bytes:
        return hashlib.sha256(f"{self.store_id}\0{key}".encode()).digest()[:16]

    def record(self, key: str, rows: int, chunks: list, decoding: bytes) -> BindingRecord:
        """The record of the shard at ``key`` of these encoded chunks, decoded as ``decoding`` says."""
        checksums = tuple(0 if c is None else chunk_checksum(c) for c in chunks)
        return BindingRecord(self.place(key), rows, checksums, decoding if self.decoding else None)


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
    def of_sizes(cls, sizes: list[int | None]) -> ShardIndex:
        """The index of chunks of these sizes laid end to end from offset 0 (None: an absent chunk)."""
        table, offset = [], 0
        for size in sizes:
            table.append((EMPTY, EMPTY) if size is None else (offset, size))
            offset += size or 0
        return cls(np.asarray(table, dtype="<u8").reshape(len(sizes), 2))

    @classmethod
    def decode(cls, tail, n_chunks: int) -> ShardIndex:
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


@dataclass(frozen=True)
class ShardTail:
    """The end of a shard, which a reader fetches first: the :class:`ShardIndex` and, in a bound
    (format-3) shard, the :class:`BindingRecord` before it, checked against the shard's key."""

    index: ShardIndex
    record: BindingRecord | None

    @staticmethod
    def nbytes(n_chunks: int, binding: ShardBinding | None) -> int:
        record = BindingRecord.nbytes(n_chunks, binding.decoding) if binding is not None else 0
        return ShardIndex.nbytes(n_chunks) + record

    @classmethod
    def decode(
        cls, tail, n_chunks: int, binding: ShardBinding | None, key: str, decoding: bytes, shard_rows: int
    ) -> ShardTail:
        """The tail of the shard at ``key`` (its last :meth:`nbytes` bytes) of ``shard_rows`` rows,
        whose array decodes as ``decoding`` (:func:`decoding_digest`) says; CorruptChunkError if they
        do not check, bind the shard to another place (another key or store), claim more rows than
        the shard has, or (format 4) bind other decoding parameters."""
        index_bytes = ShardIndex.nbytes(n_chunks)
        if len(tail) != cls.nbytes(n_chunks, binding):
            raise CorruptChunkError(
                f"shard is {len(tail)} bytes, less than its index"
                f"{' and binding record' if binding else ''} ({cls.nbytes(n_chunks, binding)})"
            )
        try:
            index = ShardIndex.decode(tail[-index_bytes:], n_chunks)
        except CorruptChunkError as exc:
            raise CorruptChunkError(f"its shard index is damaged ({exc})") from None
        if binding is None:
            return cls(index, None)
        record = BindingRecord.decode(tail[:-index_bytes], n_chunks, binding.decoding)
        if record.place != binding.place(key):
            raise CorruptChunkError(
                "its binding record names another place: these are the bytes of another "
                "shard (of another array, rows or tokens, or of another store) copied here"
            )
        if record.rows > shard_rows:
            raise CorruptChunkError(
                f"its binding record claims {record.rows} written rows, but the shard has {shard_rows}: "
                "the record is wrong"
            )
        if binding.decoding and record.decoding != decoding:
            raise CorruptChunkError(
                "its binding record binds other decoding parameters than the array's zarr.json gives "
                "(data type, shape, chunks, codecs or prediction): the documents were edited since it was written"
            )
        return cls(index, record)

    def check_rows(self, rows: int) -> None:
        """The shard holds written data for its first ``rows`` rows (a bound shard says how many)."""
        if self.record is not None and rows > self.record.rows:
            raise CorruptChunkError(
                f"it holds {self.record.rows} written rows but {rows} are read from it: an older copy of the shard?"
            )

    def check_chunk(self, i: int, chunk) -> None:
        """Inner chunk ``i``'s bytes are the ones bound to its place in the shard."""
        if self.record is not None and chunk_checksum(chunk) != self.record.checksums[i]:
            raise CorruptChunkError(
                f"inner chunk {i} is not the chunk bound to that place in its shard "
                "(chunks swapped or copied inside it?)"
            )


def encoded_nbytes(pieces: list) -> int:
    """The size of an inner chunk given as :meth:`ChunkCodecs.encode`'s pieces."""
    return sum(len(piece) for piece in pieces)


def encode_shard(
    chunks: list[list | None],
    binding: ShardBinding | None = None,
    key: str = "",
    rows: int = 0,
    decoding: bytes = b"",
) -> np.ndarray:
    """A ``sharding_indexed`` shard as a uint8 array: the inner chunks (C order of the shard's chunk
    grid; each as :meth:`ChunkCodecs.encode`'s pieces, None for an absent one), then, with a
    ``binding``, the :class:`BindingRecord` of the shard at ``key`` whose first ``rows`` rows hold
    data and whose array decodes as ``decoding`` (:func:`decoding_digest`) says, then their
    :class:`ShardIndex`. The pieces are copied in by numpy, which releases the GIL
    (``b"".join`` would hold it for every byte)."""
    sizes = [None if chunk is None else encoded_nbytes(chunk) for chunk in chunks]
    index = ShardIndex.of_sizes(sizes).encode()
    data_nbytes = sum(size or 0 for size in sizes)
    record_nbytes = BindingRecord.nbytes(len(chunks), binding.decoding) if binding is not None else 0
    shard = np.empty(data_nbytes + record_nbytes + len(index), np.uint8)
    offset, placed = 0, []
    for chunk in chunks:
        start = offset
        for piece in chunk or ():
            shard[offset : offset + len(piece)] = np.frombuffer(piece, np.uint8)
            offset += len(piece)
        placed.append(None if chunk is None else shard[start:offset])
    if binding is not None:
        shard[offset : offset + record_nbytes] = np.frombuffer(
            binding.record(key, rows, placed, decoding).encode(), np.uint8
        )
        offset += record_nbytes
    shard[offset:] = np.frombuffer(index, np.uint8)
    return shard
