"""Object storage: a trajectory at an ``s3://``, ``gs://`` or ``az://`` URL, as zarr's ``ObjectStore``
over obstore (the engine chosen in docs/object-storage-evaluation.md; docs/format.md, "Object storage").

:func:`open_url` makes an :class:`ObjectUrlStore`. Endpoint, region and credentials come from
``storage_options`` (obstore's configuration keys: ``endpoint``, ``region``, ``access_key_id``,
``secret_access_key``, ``skip_signature``, ``client_options``...), else from the environment
(``AWS_*``, ``GOOGLE_*``, ``AZURE_*``), and on S3 from boto3's credential chain when the environment
names no key (profiles, ``~/.aws`` files, SSO, instance roles: the ``s3`` extra brings boto3).

**Credentials are never pickled.** A store pickles as its URL and its *public* options
(:func:`public_options`: every option naming a secret, key, token or credential dropped), and
unpickling opens the URL again, so a dask worker finds credentials in its own environment.

**Fenced writes.** A writer's store carries a *fence* (the writer's lease, :mod:`wordystore.store.lease`)
and then writes every key conditionally: If-Match on the etag this writer last wrote (or, for
``commit.json`` when it took the store over, read) there; create-only for a key it has never
written. A create refused (the key was left by an earlier writer) is made If-Match on the key's
current etag only after re-reading the lease: still this writer's. So once another writer has
taken the lease over, this one can neither commit nor overwrite anything the new holder wrote:
the server refuses (HTTP 412), and the write raises :class:`wordystore.errors.StaleWriterError`.
Every write and delete first checks the lease by this process's own clock. It costs no request
in the steady state: a first write is one PUT, a rewrite one PUT.

Keys: obstore itself refuses ``.`` and ``..`` parts, so nothing here reaches outside the URL's
prefix; :mod:`wordystore.store.storage` checks every key before it gets here anyway (docs/security.md).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import threading
from typing import Protocol

from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.storage import ObjectStore

from wordystore.errors import FormatError, MissingExtraError, StaleWriterError, StorageError
from wordystore.optional import install_hint

SCHEMES = {"s3": "s3", "s3a": "s3", "gs": "gs", "az": "az", "azure": "az", "abfs": "az", "abfss": "az"}
SECRET_WORDS = ("secret", "token", "password", "key", "sas", "credential", "header", "authorization")
AWS_KEY_OPTIONS = ("access_key_id", "aws_access_key_id", "skip_signature", "aws_skip_signature")
AWS_KEY_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
)  # obstore reads these itself
CREDENTIALS_HINT = {
    "s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws/credentials (with boto3, the s3 extra), "
    "storage_options={'access_key_id': ..., 'secret_access_key': ...}, or {'skip_signature': True} for a "
    "public bucket",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS or storage_options={'service_account_path': ...}",
    "az": "AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY (or a SAS token) or the same in storage_options",
}


def url_scheme(text: str) -> str | None:
    """``"s3"``, ``"gs"`` or ``"az"`` for a URL of object storage wordystore opens, else None."""
    scheme, sep, _ = text.partition("://")
    return SCHEMES.get(scheme.lower()) if sep else None


def public_options(options: dict) -> dict:
    """``options`` without any that may hold a secret: a name with secret, key, token, password,
    SAS, credential, header or authorization in it (a credential provider too), at any depth."""
    return {
        name: public_options(value) if isinstance(value, dict) else value
        for name, value in options.items()
        if not any(word in name.lower() for word in SECRET_WORDS)
    }


def _obstore():
    try:
        return importlib.import_module("obstore")
    except ImportError:
        raise MissingExtraError(
            f"object storage (s3://, gs://, az://) needs obstore, which is not installed; {install_hint('s3')}"
        ) from None


def open_url(url: str, storage_options: dict | None = None, read_only: bool = False) -> ObjectUrlStore:
    """The store at ``url`` (``s3://bucket/path``, ``gs://...``, ``az://...``), credentials resolved
    here (module docstring). A store pickles as ``open_url(url, public options, read_only)``."""
    scheme = url_scheme(url)
    if scheme is None:
        raise ValueError(
            f"{url!r} is not a URL wordystore opens; expected a local path, file://, "
            f"{', '.join(f'{s}://' for s in SCHEMES)}"
        )
    obstore = _obstore()
    options = dict(storage_options or {})
    if scheme == "s3" and "credential_provider" not in options:
        provider = _aws_credentials(url, options)
        if provider is not None:
            options["credential_provider"] = provider
    try:
        inner = obstore.store.from_url(url, **options)
    except (ValueError, TypeError, obstore.exceptions.BaseError) as exc:
        raise StorageError(
            f"cannot open {url}: {_first_line(exc)}; storage_options are obstore's configuration "
            "keys (endpoint, region, access_key_id, client_options, ...)"
        ) from exc
    return ObjectUrlStore(inner, url=url, options=public_options(dict(storage_options or {})), read_only=read_only)


def _aws_credentials(url: str, options: dict):
    """boto3's credential chain as an obstore credential provider, when neither ``options`` nor the
    environment name a key (None: obstore reads them itself). No credentials anywhere: StorageError."""
    if any(options.get(name) for name in AWS_KEY_OPTIONS) or any(os.environ.get(v) for v in AWS_KEY_VARIABLES):
        return None
    try:
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:  # no boto3: only the environment and storage_options
        raise StorageError(
            f"no AWS credentials for {url}: the environment has no AWS_ACCESS_KEY_ID and boto3 (which "
            f"reads profiles, ~/.aws and instance roles) is not installed; set "
            f"{CREDENTIALS_HINT['s3']}, or {install_hint('s3')}"
        ) from None
    try:
        return Boto3CredentialProvider()
    except ValueError:  # boto3's chain found nothing
        raise StorageError(f"no AWS credentials for {url}: set {CREDENTIALS_HINT['s3']}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).split("\n\nDebug")[0].strip()
    return " ".join(text.split())[:400] or type(exc).__name__


class Fence(Protocol):
    """What a writer's store asks of the writer's lease (:class:`wordystore.store.lease.Lease`)."""

    generation: int

    def check(self) -> None:
        """Raise StaleWriterError unless the lease is still valid by this process's clock."""

    def still_ours(self) -> bool:
        """Read the lease object: is it still this writer's?"""


class ObjectUrlStore(ObjectStore):
    """zarr's ``ObjectStore`` for a URL: synchronous, bounded reads; writes fenced by a writer's
    lease once :meth:`fence_with` gave it one; errors as one line naming the URL; pickled as its
    URL and public options (module docstring)."""

    def __init__(self, store, *, url: str, options: dict, read_only: bool = False):
        super().__init__(store, read_only=read_only)
        self.url, self.options = url.rstrip("/"), options
        self._obstore = _obstore()
        self._fence: Fence | None = None
        self._etags: dict[str, str] = {}  # key -> etag of this writer's last write there
        self._etags_lock = threading.Lock()

    def __reduce__(self):
        return open_url, (self.url, self.options, self.read_only)

    def with_read_only(self, read_only: bool = False) -> ObjectUrlStore:
        return ObjectUrlStore(self.store, url=self.url, options=self.options, read_only=read_only)

    def __str__(self) -> str:
        return self.url

    def __eq__(self, other) -> bool:
        return isinstance(other, ObjectUrlStore) and (other.url, other.read_only) == (self.url, self.read_only)

    def __hash__(self) -> int:
        return hash((self.url, self.read_only))

    # -- reads ------------------------------------------------------------------------------------

    def read(self, key: str, request=None, limit: int | None = None) -> bytes | None:
        """The bytes of ``request`` (a zarr byte request; None: all) of ``key``, None if absent.
        More than ``limit`` bytes is a FormatError, raised before the body is read."""
        obs = self._obstore
        options = {}
        if isinstance(request, RangeByteRequest):
            options["range"] = (request.start, request.end)
        elif isinstance(request, SuffixByteRequest):
            options["range"] = {"suffix": request.suffix}
        elif isinstance(request, OffsetByteRequest):
            options["range"] = {"offset": request.offset}
        try:
            result = self._call("read", key, obs.get, self.store, key, options=options)
        except FileNotFoundError:
            return None
        except _RangeNotSatisfiable:  # a range starting past the end: nothing, as a file read gives
            return b""
        start, end = result.range
        if limit is not None and end - start > limit:
            raise FormatError(
                f"{self.url}/{key} is {result.meta['size']} bytes; wordystore reads at most {limit} "
                "of it (the store is damaged, or not what it claims)"
            )
        return bytes(result.bytes())

    def read_ranges(self, key: str, ranges: list[tuple[int, int]]) -> list[bytes] | None:
        """Several byte ranges ``[start, end)`` of ``key`` (nearby ones in one request); None if absent."""
        try:
            values = self._call(
                "read",
                key,
                self._obstore.get_ranges,
                self.store,
                key,
                starts=[start for start, _ in ranges],
                ends=[end for _, end in ranges],
            )
        except FileNotFoundError:
            return None
        except _RangeNotSatisfiable:  # one starts past the end: each alone, clipped as a file read clips
            values = [self.read(key, RangeByteRequest(start, end)) for start, end in ranges]
            return None if any(v is None for v in values) else values
        return [bytes(v) for v in values]

    def read_versioned(self, key: str, limit: int) -> tuple[bytes, str] | None:
        """The whole value of ``key`` and its etag (for a conditional write after it); None if absent."""
        try:
            result = self._call("read", key, self._obstore.get, self.store, key)
        except FileNotFoundError:
            return None
        if result.meta["size"] > limit:
            raise FormatError(f"{self.url}/{key} is {result.meta['size']} bytes; wordystore reads at most {limit}")
        return bytes(result.bytes()), result.meta["e_tag"]

    def etag(self, key: str) -> str | None:
        try:
            return self._call("look up", key, self._obstore.head, self.store, key)["e_tag"]
        except FileNotFoundError:
            return None

    def sizes(self, prefix: str) -> dict[str, int]:
        """Every key under ``prefix`` with its size (one listing, no request per key)."""
        listing = self._call("list", prefix, self._obstore.list, self.store, prefix or None)
        return {meta["path"]: meta["size"] for batch in listing for meta in batch}

    # -- writes -----------------------------------------------------------------------------------

    def fence_with(self, fence: Fence | None) -> None:
        """From now on, write as the holder of ``fence`` (module docstring); forget earlier etags."""
        with self._etags_lock:
            self._fence, self._etags = fence, {}

    def remember(self, key: str, etag: str) -> None:
        """Write ``key`` next If-Match on ``etag`` (one this writer read: the record it takes over)."""
        with self._etags_lock:
            self._etags[key] = etag

    def write(self, key: str, data) -> None:
        """Replace ``key`` whole; fenced once :meth:`fence_with` gave this store a lease."""
        self._check_writable()
        fence = self._fence
        if fence is None:
            self._put(key, data)
            return
        fence.check()
        with self._etags_lock:
            etag = self._etags.get(key)
        try:
            if etag is not None:
                result = self._put(key, data, {"e_tag": etag})
            else:
                result = self._put_unseen(key, data, fence)
        except self._obstore.exceptions.PreconditionError:
            raise StaleWriterError(
                f"{self.url}/{key} was rewritten by another writer since this one (lease generation "
                f"{fence.generation}) wrote it: another writer took the store over, and this one writes nothing more"
            ) from None
        with self._etags_lock:
            self._etags[key] = result["e_tag"]

    def _put_unseen(self, key: str, data, fence: Fence) -> dict:
        """A key this writer has not written: create it; if it exists (left by an earlier writer, such
        as a block that writer flushed), overwrite it only while the lease is still ours."""
        try:
            return self._put(key, data, "create")
        except self._obstore.exceptions.AlreadyExistsError:
            etag = self.etag(key)
            if not fence.still_ours():
                raise StaleWriterError(
                    f"{self.url}: the writer lease (generation {fence.generation}) was taken over "
                    f"by another writer; this one does not write {key}"
                ) from None
            return self._put(key, data, "create" if etag is None else {"e_tag": etag})

    def write_if(self, key: str, data, expect: str | None) -> str:
        """Put ``key`` only if it does not exist (``expect`` None) or still has etag ``expect``; returns
        the new etag. Refused: :class:`ConditionFailed` (another writer got there first)."""
        self._check_writable()
        exceptions = self._obstore.exceptions
        try:
            return self._put(key, data, "create" if expect is None else {"e_tag": expect})["e_tag"]
        except (exceptions.AlreadyExistsError, exceptions.PreconditionError):
            raise ConditionFailed(f"{self.url}/{key} changed meanwhile") from None

    def _put(self, key: str, data, mode="overwrite") -> dict:
        # One request (no multipart): conditions apply to single PUTs, and a shard is at most tens of MB.
        return self._call("write", key, self._obstore.put, self.store, key, data, mode=mode, use_multipart=False)

    def remove(self, key: str) -> None:
        """Delete ``key`` (absent is fine); a fenced store first checks its lease."""
        self._check_writable()
        if self._fence is not None:
            self._fence.check()
        try:
            self._call("delete", key, self._obstore.delete, self.store, key)
        except FileNotFoundError:
            pass
        with self._etags_lock:
            self._etags.pop(key, None)

    # zarr's asynchronous API (zarr-python handed this store writes through it too): the same writes.

    async def set(self, key: str, value) -> None:
        await asyncio.to_thread(self.write, key, value.to_bytes())

    async def set_if_not_exists(self, key: str, value) -> None:
        try:
            await asyncio.to_thread(self.write_if, key, value.to_bytes(), None)
        except ConditionFailed:
            pass

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self.remove, key)

    # -- errors -----------------------------------------------------------------------------------

    def _call(self, what: str, key: str, function, *args, **kwargs):
        """``function(*args, **kwargs)``: obstore's errors but absence and refused conditions as one
        StorageError line naming the URL, the key and what to check."""
        exceptions = self._obstore.exceptions
        try:
            return function(*args, **kwargs)
        except (FileNotFoundError, exceptions.AlreadyExistsError, exceptions.PreconditionError):
            raise
        except exceptions.BaseError as exc:
            text, scheme = _first_line(exc), url_scheme(self.url)
            if " 416 " in text:
                raise _RangeNotSatisfiable() from None
            if isinstance(exc, (exceptions.PermissionDeniedError, exceptions.UnauthenticatedError)):
                raise StorageError(
                    f"{self.url}: {what} {key!r} was refused ({text}); check the credentials: "
                    f"{CREDENTIALS_HINT[scheme]}"
                ) from exc
            if "169.254.169.254" in text:  # obstore fell back to an instance's metadata service, and found none
                raise StorageError(f"no credentials for {self.url}: set {CREDENTIALS_HINT[scheme]}") from exc
            raise StorageError(
                f"{self.url}: {what} {key!r} failed ({text}); check the endpoint (AWS_ENDPOINT_URL or "
                "storage_options={'endpoint': ...}) and the network"
            ) from exc


class ConditionFailed(Exception):
    """A conditional write found its key not as it expected: another writer wrote it first."""


class _RangeNotSatisfiable(Exception):
    """HTTP 416: a byte range starting at or past the end of the object."""
