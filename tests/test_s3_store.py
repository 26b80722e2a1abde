"""URLs wherever a path goes, against real S3 servers on loopback (moto, SeaweedFS): the library's
create/resume/open, every store-taking CLI command, ``file://``; the same keys and bits as a
directory; credentials from the environment or ``storage_options``, never pickled; and one clear
line (exit status 2) for no credentials, wrong ones, no obstore, or a URL wordystore does not open."""

import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("obstore")

from s3_rows import Rows  # noqa: E402
from s3_servers import SECRET_KEY, moto_server, s3_bucket, s3_server, seaweedfs_server  # noqa: E402,F401

import wordystore  # noqa: E402
from wordystore import trajectory  # noqa: E402
from wordystore.cli import main  # noqa: E402
from wordystore.format.keys import WRITER_LOCK_KEY
from wordystore.optional import install_hint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NO_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def local_keys(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != WRITER_LOCK_KEY)


def test_a_url_works_wherever_a_path_does(s3_bucket, tmp_path, capsys):
    url, rows = f"{s3_bucket.url}/runs/a.zarr", Rows()
    sets = {"trained": rows.trained, "untrained": rows.untrained}
    scalars = {
        "init_scale": 0.02,
        "learning_rate": 1e-3,
        "weight_decay": 0.0,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "n_trained": len(rows.trained),
        "n_untrained": len(rows.untrained),
    }  # what export writes beside the rows
    for where in (url, tmp_path / "a.zarr"):
        with wordystore.create(where, rows.kinds(), token_sets=sets, config={"seed_scalars": scalars}) as writer:
            rows.append(writer, 0, 10)
        with wordystore.resume(where) as writer:
            rows.append(writer, 10, 20)
    keys = sorted(k.removeprefix("runs/a.zarr/") for k in s3_bucket.keys("runs/a.zarr/"))
    assert [k for k in keys if k != WRITER_LOCK_KEY] == local_keys(tmp_path / "a.zarr")  # the format, key for key
    t = trajectory.open(url)
    assert rows.check(t) == 20 and np.array_equal(t.token_set("untrained"), rows.untrained)

    out, going_on = tmp_path / "a.safetensors", f"{s3_bucket.url}/runs/a-continued.zarr"
    with wordystore.create(going_on, rows.kinds(), token_sets=sets, config={"seed_scalars": scalars}) as writer:
        rows.append(writer, 20, 30)
    for command in (
        ["info", url, "--json"],
        ["verify", url, "--quiet"],
        ["export", url, str(out), "--quiet"],
        ["import", str(out), f"{s3_bucket.url}/runs/b.zarr", "--quiet"],
        ["stitch", url, going_on, f"{s3_bucket.url}/runs/c.zarr", "--quiet"],
        ["export-scalars", url, "--tensorboard", str(tmp_path / "tb"), "--quiet"],
        ["report", url, "--out", str(tmp_path / "report"), "--quiet"],
    ):
        assert main(command) == 0, (command, capsys.readouterr().err)
    assert np.array_equal(
        trajectory.open(f"{s3_bucket.url}/runs/b.zarr").embeddings.numpy().view(np.uint16),
        t.embeddings.numpy().view(np.uint16),
    )
    assert rows.check(trajectory.open(f"{s3_bucket.url}/runs/c.zarr")) == 30
    file_url = f"file://{tmp_path / 'a.zarr'}"
    assert rows.check(trajectory.open(file_url)) == 20


def test_explicit_credentials_are_used_and_never_pickled(s3_bucket, monkeypatch):
    url, rows = f"{s3_bucket.url}/run.zarr", Rows()
    with wordystore.create(url, rows.kinds()) as writer:
        rows.append(writer, 0, 9)
    server = s3_bucket.server
    options = {
        "endpoint": server.endpoint,
        "region": server.region,
        "access_key_id": server.access_key_id,
        "secret_access_key": server.secret_access_key,
        "client_options": {"allow_http": True},
    }
    for name in NO_CREDENTIALS:
        monkeypatch.delenv(name)
    t = trajectory.open(url, storage_options=options)
    assert rows.check(t) == 9
    graph = dict(t.momentum.to_dask()[:, :100].__dask_graph__())
    for pickled in (pickle.dumps(t), pickle.dumps(t.store), pickle.dumps(t.embeddings), pickle.dumps(graph)):
        assert SECRET_KEY.encode() not in pickled and server.access_key_id.encode() not in pickled

    # unpickled elsewhere, the store finds credentials where that process has them: its environment
    reopen = textwrap.dedent("""
        import pickle, sys
        t = pickle.loads(sys.stdin.buffer.read())
        print(len(t), t.momentum[:, :100].float().abs().sum().item())
    """)
    with_keys = {**os.environ, "AWS_ACCESS_KEY_ID": server.access_key_id, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    done = subprocess.run(
        [sys.executable, "-c", reopen], input=pickle.dumps(t), capture_output=True, env=with_keys, timeout=120
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().split() == ["9", str(t.momentum[:, :100].float().abs().sum().item())]


def test_credentials_from_the_aws_config_files_through_boto3(s3_bucket, tmp_path, monkeypatch):
    url, rows = f"{s3_bucket.url}/run.zarr", Rows()
    for name in NO_CREDENTIALS:
        monkeypatch.delenv(name)
    server = s3_bucket.server  # the fixture points AWS_SHARED_CREDENTIALS_FILE at an empty file: fill it
    Path(os.environ["AWS_SHARED_CREDENTIALS_FILE"]).write_text(
        f"[default]\naws_access_key_id = {server.access_key_id}\naws_secret_access_key = {SECRET_KEY}\n"
    )
    with wordystore.create(url, rows.kinds()) as writer:
        rows.append(writer, 0, 3)
    assert rows.check(trajectory.open(url)) == 3


def test_a_damaged_lease_is_a_format_error_naming_it(s3_bucket):
    url = f"{s3_bucket.url}/run.zarr"
    with wordystore.create(url, Rows().kinds()):
        pass
    store = s3_bucket.obstore(prefix="run.zarr")
    __import__("obstore").put(store, WRITER_LOCK_KEY, b'{"owner": "x", "generation": -1}')
    with pytest.raises(wordystore.FormatError, match=f"{url}/.wordystore-writer.lock is not a writer lease"):
        wordystore.resume(url)


def test_a_child_process_writer_stays_in_this_process_on_object_storage_and_says_so(s3_bucket):
    """The writer's child process shares a directory's lock and needs a local store: on object storage
    the pools stay in the writing process (its puts fenced by its lease), with a warning naming why."""
    url, rows = f"{s3_bucket.url}/run.zarr", Rows()
    with pytest.warns(RuntimeWarning, match="a child process needs a local store"):
        writer = wordystore.create(url, rows.kinds(), writer_process=True)
    with writer:
        rows.append(writer, 0, 9)
    t = trajectory.open(url)
    assert rows.check(t) == 9 and t.commit_record.writer["process"] is False


def test_missing_or_wrong_credentials_are_one_line_and_exit_status_2(s3_bucket, monkeypatch, capsys):
    url = f"{s3_bucket.url}/run.zarr"
    with wordystore.create(url, Rows().kinds()):
        pass
    for name in NO_CREDENTIALS:
        monkeypatch.delenv(name)
    assert main(["info", url]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"wordystore info: error: no AWS credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
        "AWS_PROFILE or ~/.aws/credentials (with boto3, the s3 extra), storage_options={'access_key_id': ..., "
        "'secret_access_key': ...}, or {'skip_signature': True} for a public bucket"
    ]
    if s3_bucket.server.name == "moto":
        return  # moto takes any signature; SeaweedFS checks them
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_bucket.server.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    assert main(["verify", url]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"wordystore verify: error: {url}: read 'zarr.json' was refused (")
    assert line.endswith(
        "check the credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE or "
        "~/.aws/credentials (with boto3, the s3 extra), storage_options={'access_key_id': ..., "
        "'secret_access_key': ...}, or {'skip_signature': True} for a public bucket"
    )


def test_without_obstore_or_with_another_scheme_a_url_is_one_line(tmp_path):
    script = textwrap.dedent("""
        import sys
        sys.modules["obstore"] = None  # as if not installed
        from wordystore.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    done = subprocess.run(
        [sys.executable, "-c", script, "info", "s3://bucket/run.zarr"], capture_output=True, text=True, timeout=120
    )
    assert (done.returncode, done.stderr.splitlines()) == (
        2,
        [
            "wordystore info: error: object storage (s3://, gs://, az://) needs obstore, which is not installed; "
            f"{install_hint('s3')}"
        ],
    )
    assert main(["info", "http://example.com/run.zarr"]) == 2
    with pytest.raises(ValueError, match="storage_options apply to s3://, gs:// and az:// URLs"):
        wordystore.open(tmp_path / "run.zarr", storage_options={"region": "us-east-1"})
