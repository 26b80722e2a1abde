"""The errors wordystore raises, each naming what was wrong and what was expected."""


class WordystoreError(Exception):
    """Base class of wordystore's own errors."""


class FormatError(WordystoreError):
    """The store is not a wordystore trajectory, or one of a format version this code cannot read."""


class AppendError(WordystoreError, ValueError):
    """An ``append`` was refused: unknown or missing kind, wrong shape or dtype, out-of-order step."""


class ReadOnlyError(WordystoreError, PermissionError):
    """A write was asked of a store opened for reading."""


class StoreLockedError(WordystoreError):
    """Another writer holds the store's lock."""


class WriterFailedError(WordystoreError):
    """The background writer failed; the cause is chained. Steps committed before it stay readable."""


class CorruptChunkError(WordystoreError):
    """A chunk's bytes do not decode (checksum mismatch, truncation); names the array and chunk."""


class MissingExtraError(WordystoreError, ImportError):
    """An optional dependency is not installed; names the extra that brings it."""


class RoundTripWarning(UserWarning):
    """An export or import leaves something behind that the target cannot hold; names it."""
