"""The S3 servers of tests/s3_servers.py start, and obstore's conditional writes are real on each:
``put(mode="create")`` is refused when the key exists, a ``put`` with ``UpdateVersion(e_tag=...)``
is refused on a stale etag (HTTP 412 from the server, not a client-side check)."""

import pytest

pytest.importorskip("obstore")

import obstore  # noqa: E402
from obstore.exceptions import AlreadyExistsError, PreconditionError  # noqa: E402
from s3_servers import CountingProxy, moto_server, s3_bucket, s3_server, seaweedfs_server  # noqa: E402,F401


def test_put_and_get_through_the_environment(s3_bucket):
    from obstore.store import S3Store

    store = S3Store(s3_bucket.name)  # endpoint, credentials, allow_http: all from AWS_* variables
    obstore.put(store, "a/b", b"hello")
    assert bytes(obstore.get(store, "a/b").bytes()) == b"hello"
    assert s3_bucket.keys() == ["a/b"]


def test_create_only_put_is_refused_the_second_time(s3_bucket):
    store = s3_bucket.obstore()
    obstore.put(store, "lease.json", b"first", mode="create")
    with pytest.raises(AlreadyExistsError):
        obstore.put(store, "lease.json", b"second", mode="create")
    assert bytes(obstore.get(store, "lease.json").bytes()) == b"first"


def test_if_match_put_is_refused_on_a_stale_etag(s3_bucket):
    store = s3_bucket.obstore()
    first = obstore.put(store, "commit.json", b"v1")
    second = obstore.put(store, "commit.json", b"v2", mode={"e_tag": first["e_tag"]})
    assert second["e_tag"] != first["e_tag"]
    with pytest.raises(PreconditionError):
        obstore.put(store, "commit.json", b"stale", mode={"e_tag": first["e_tag"]})
    assert bytes(obstore.get(store, "commit.json").bytes()) == b"v2"


def test_counting_proxy_counts_and_keeps_signatures_valid(s3_bucket):
    with CountingProxy(s3_bucket.server.endpoint) as proxy:
        store = s3_bucket.obstore(endpoint=proxy.endpoint)
        obstore.put(store, "k", b"x" * 1000, mode="create")
        with pytest.raises(AlreadyExistsError):
            obstore.put(store, "k", b"y", mode="create")
        assert obstore.head(store, "k")["size"] == 1000
        assert len(bytes(obstore.get(store, "k").bytes())) == 1000
        counts = proxy.snapshot()
    assert counts["requests"] == {"PUT-create": 2, "HEAD": 1, "GET": 1}
    assert counts["sent"]["PUT-create"] == 1001 and counts["received"]["GET"] == 1000
    assert counts["refused"] == {"PUT-create 412": 1}
