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


class BackpressureWarning(UserWarning):
    """Appends had to wait for the writer: this machine could not write (or compact) as fast as it
    trained. The message gives the rates; ``writer.stats()`` the counters."""
