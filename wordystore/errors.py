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
    """Another writer holds the store's lock (on object storage, its lease)."""


class StaleWriterError(StoreLockedError):
    """This writer lost its lease on object storage (it expired, or another writer took it over):
    it writes nothing more. Names the key it was refused and the generations."""


class StorageError(WordystoreError):
    """Object storage refused or could not be reached (credentials, permissions, network); names
    the URL, the operation and what to check."""


class WriterFailedError(WordystoreError):
    """The background writer failed; the cause is chained. Steps committed before it stay readable."""


class CorruptChunkError(WordystoreError):
    """A chunk's bytes do not decode (checksum mismatch, truncation); names the array and chunk."""


class MissingExtraError(WordystoreError, ImportError):
    """An optional dependency is not installed; names the extra that brings it."""


class LeaseWaitWarning(UserWarning):
    """A writer waits for another writer's lease on object storage to expire (a writer that died
    holds it until then); names the holder and how long."""


class RoundTripWarning(UserWarning):
    """An export or import leaves something behind that the target cannot hold; names it."""


class BackpressureWarning(UserWarning):
    """Appends had to wait for the writer: this machine could not write (or compact) as fast as it
    trained. The message gives the rates; ``writer.stats()`` the counters."""
