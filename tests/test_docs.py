"""Every code block in README.md and docs/*.md runs, as a reader would paste it.

How blocks are found and run (docs/architecture.md, "Docs that run"):

- a fenced block whose info string starts with ``python`` runs as a script of its own (in this
  process, as ``__main__`` in a fresh namespace with no arguments: torch is imported once), ``bash``
  as a ``bash -e -o pipefail`` script (the environment's ``wordystore`` first on PATH); both in a
  directory holding the stores the docs name (``runs/wb1b.zarr``: a small real ``wordystore train``
  run with GPT-2's vocabulary, and the rest built from it), a fresh copy per file;
- ``json`` blocks must parse; blocks without an info string or marked ``text`` are not code
  (diagrams, outputs, synopses);
- ``no-run`` after the language (```` ```bash no-run ````) marks a block that must not run here,
  with the reason in the text around it: the main job itself (minutes), the test suite itself;
- ``s3://BUCKET/`` URLs name buckets of a real S3 server on loopback (moto's, tests/s3_servers.py),
  empty when a file's blocks start, with the ``AWS_*`` environment pointing at it.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```$", re.M | re.S)
BUCKET = re.compile(r"s3://([a-z0-9][a-z0-9.-]{2,62})/")
RUNNABLE, DATA, NOT_CODE = {"python", "bash"}, {"json"}, {"", "text"}


def blocks(path: Path) -> list[tuple[int, str, list[str], str]]:
    """(line, language, markers, code) of every fenced block of ``path``."""
    text = path.read_text()
    found = []
    for match in FENCE.finditer(text):
        language, *markers = match[1].split() or [""]
        found.append((text.count("\n", 0, match.start()) + 1, language, markers, match[2]))
    return found


def test_every_block_is_code_data_or_text_and_no_run_is_rare():
    for path in DOCS:
        for line, language, markers, _ in blocks(path):
            assert language in RUNNABLE | DATA | NOT_CODE, f"{path.name}:{line}: unknown block language {language!r}"
            assert set(markers) <= {"no-run"}, f"{path.name}:{line}: unknown marker {markers}"
    skipped = [(p.name, line) for p in DOCS for line, _, markers, _ in blocks(p) if "no-run" in markers]
    assert len(skipped) <= 3, skipped


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The stores the docs name, small and real: a trainer run with GPT-2's vocabulary (every kind, token
    sets, resume state), copies of it as the runs compared, and the notebook's mask file of its token sets."""
    import torch
    from safetensors.torch import save_file

    import wordystore
    from trainer.config import RunConfig
    from trainer.run import train

    root = tmp_path_factory.mktemp("docs")
    small = dict(steps=6, hidden_dim=4, n_head=2, batch_size=2, max_seq_len=16, bf16_matmul="native")
    train(root / "runs" / "wb1b.zarr", RunConfig(**small), progress=False)
    for copy in ("a.zarr", "b.zarr"):
        shutil.copytree(root / "runs" / "wb1b.zarr", root / "runs" / copy)
    t = wordystore.open(root / "runs" / "wb1b.zarr")
    save_file(
        {f"{name}_indices": torch.from_numpy(ids) for name, ids in t.token_sets.items()},
        str(root / "fineweb_token_masks.safetensors"),
    )
    return root


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server for the blocks that name s3:// URLs (None without obstore or moto)."""
    from s3_servers import ServerUnavailable, start_moto

    try:
        import obstore  # noqa: F401

        with start_moto() as server:
            yield server
    except (ImportError, ServerUnavailable):
        yield None


def empty_buckets(server, text: str) -> None:
    """Every bucket ``text`` names, made and emptied (a file's blocks start from no store)."""
    client = server.boto3_client()
    for name in sorted(set(BUCKET.findall(text))):
        if name not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
            client.create_bucket(Bucket=name)
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            for item in page.get("Contents", []):
                client.delete_object(Bucket=name, Key=item["Key"])


def workdir(stores, tmp_path) -> Path:
    where = tmp_path / "work"
    shutil.copytree(stores, where)
    return where


def run_bash(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("path", DOCS, ids=[p.name for p in DOCS])
def test_every_block_runs(path, stores, s3, tmp_path, monkeypatch):
    cwd = workdir(stores, tmp_path)
    monkeypatch.chdir(cwd)
    if BUCKET.search(path.read_text()):
        if s3 is None:
            pytest.skip(f"{path.name} names s3:// buckets and no S3 server starts here (obstore, moto)")
        for name, value in s3.env(tmp_path).items():
            monkeypatch.setenv(name, value)
        empty_buckets(s3, path.read_text())
    monkeypatch.setattr(sys, "argv", [f"{path.name}-block.py"])
    for line, language, markers, code in blocks(path):
        if language in DATA:
            json.loads(code)
        if language not in RUNNABLE or "no-run" in markers:
            continue
        if language == "python":
            exec(
                compile(code, f"{path.name}:{line}", "exec"), {"__name__": "__main__"}
            )  # a failure shows its traceback
            continue
        done = run_bash(code, cwd)
        assert done.returncode == 0, (
            f"{path.name}:{line} failed:\n{code}\n--- output:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        )
