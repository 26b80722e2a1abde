"""``wordystore train --resume`` and ``--extend-to`` as a user meets them: real processes, killed with
SIGKILL or stopped with Ctrl-C at random steps, compared bit for bit with an uninterrupted run."""

import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import wordystore
from trainer import run
from trainer.config import RunConfig
from wordystore import trajectory
from wordystore.analysis import report
from wordystore.read import display

STEPS = 120
SMALL = dict(vocab_size=300, hidden_dim=8, batch_size=4, max_seq_len=16)
FLAGS = ["--vocab-size", "300", "--hidden-dim", "8", "--batch-size", "4", "--max-seq-len", "16", "--quiet"]


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wordystore.cli", *map(str, args)], capture_output=True, text=True, timeout=300
    )


def start(*args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "wordystore.cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def committed_rows(path) -> int:
    try:
        return len(trajectory.open(path))
    except (FileNotFoundError, wordystore.WordystoreError):  # not created yet
        return 0


def interrupt(proc: subprocess.Popen, path, rows: int, sig: int) -> str:
    """Send ``sig`` to ``proc`` as soon as ``path`` has ``rows`` committed rows; its stdout."""
    while committed_rows(path) < rows:
        assert proc.poll() is None, f"the run ended before {rows} rows: {proc.communicate()}"
        time.sleep(0.01)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    return out


def assert_same_bits(a, b):
    a, b = trajectory.open(a), trajectory.open(b)
    np.testing.assert_array_equal(a.steps, b.steps)
    assert a.kinds == b.kinds
    for name in a.kinds:
        assert a[name].numpy(slice(None)).tobytes() == b[name].numpy(slice(None)).tobytes(), f"{name} differs"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    path = tmp_path_factory.mktemp("full") / "full.zarr"
    run.train(path, RunConfig(steps=STEPS, **SMALL), progress=False)
    return path


def test_kill_9_and_ctrl_c_at_random_steps_then_resume_record_the_same_bits(uninterrupted, tmp_path):
    rng = random.Random()
    first, second = rng.randrange(2, 50), rng.randrange(20, 80)
    path = tmp_path / "part.zarr"

    interrupt(start("train", path, "--steps", STEPS, *FLAGS), path, first, signal.SIGKILL)
    saved = wordystore.load_state(path)
    assert saved is not None and saved[2] == trajectory.open(path).steps[-1], f"killed after {first} rows"

    proc = start("train", path, "--resume", "--quiet")
    # past the rows it started from: its handler for Ctrl-C is installed by then
    second = max(second, committed_rows(path) + 1)
    out = interrupt(proc, path, second, signal.SIGINT)
    assert proc.returncode == 128 + signal.SIGINT, f"stopped after {second} rows"
    stopped_at = trajectory.open(path).steps[-1]
    assert f"stopped at step {stopped_at} of {STEPS}; go on with: wordystore train {path} --resume" in out
    assert wordystore.load_state(path)[2] == stopped_at  # a clean stop keeps the state of its last row

    result = cli("train", path, "--resume", "--quiet")
    assert result.returncode == 0, result.stderr
    new = f"recorded {STEPS - stopped_at} new rows (steps {stopped_at + 1}..{STEPS}; {STEPS + 1} in all)"
    assert new in result.stdout
    assert_same_bits(uninterrupted, path)
    assert not list(tmp_path.glob("*.trainer"))  # the Trainer's output_dir was a temporary one


def test_resume_refuses_other_parameters_and_changed_inputs(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    path = tmp_path / "c.zarr"
    run.train(path, RunConfig(steps=3, corpus=str(corpus), **SMALL), progress=False)
    with pytest.raises(ValueError, match="hidden_dim: stored 8, given 16; seed: stored 42, given 7"):
        run.resume(path, overrides={"hidden_dim": 16, "seed": 7})
    with pytest.raises(ValueError, match="the run is finished"):
        run.resume(path, overrides={"hidden_dim": 8})  # the stored value, given again: fine
    corpus.write_text("Another text altogether, long enough for a window of seventeen tokens. " * 10)
    with pytest.raises(ValueError, match="inputs changed since it was recorded .*corpus_sha256"):
        run.resume(path)


def test_resume_refuses_a_state_whose_embeddings_are_not_the_last_row(tmp_path):
    """A state that passes its checksum (rewritten as a writer writes one) but is not of the run's
    last row: resume and extend refuse it rather than go on from other parameters."""
    import json

    import torch

    from wordystore.store.resume_state import ResumeState

    path = tmp_path / "s.zarr"
    run.train(path, RunConfig(steps=3, **SMALL), progress=False)
    tensors, info, step = wordystore.load_state(path)
    tensors[run.EMBEDDING_STATE].view(torch.int16)[5, 0] ^= 1  # one bit of one token's embedding
    record = json.loads((path / "commit.json").read_text())
    entry = record["states"][-1]
    state = ResumeState(entry["row"], step, tensors, info)
    data = state.encode()
    (path / entry["key"]).write_bytes(data)
    record["states"][-1] = state.entry(data)
    (path / "commit.json").write_text(json.dumps(record))
    assert torch.equal(wordystore.load_state(path)[0][run.EMBEDDING_STATE], tensors[run.EMBEDDING_STATE])
    with pytest.raises(
        ValueError,
        match=r"the saved state's embedding parameters are not the store's last embeddings "
        r"row \(step 3\) bit for bit",
    ):
        run.extend(path, 5, "hold", progress=False)


def test_extend_to_records_the_seam_and_holds_the_last_learning_rate(uninterrupted, tmp_path):
    path = tmp_path / "ext.zarr"
    shutil.copytree(uninterrupted, path)
    before = trajectory.open(path).embeddings.numpy(slice(None)).tobytes()

    run.extend(path, STEPS + 8, "hold", progress=False)
    t = trajectory.open(path)
    np.testing.assert_array_equal(t.steps, np.arange(STEPS + 9))
    assert t.embeddings.numpy(slice(0, STEPS + 1)).tobytes() == before  # the past is untouched
    (ext,) = t.config["extensions"]
    assert ext["seam_step"] == STEPS and ext["to_step"] == STEPS + 8 and ext["lr_policy"] == "hold"
    np.testing.assert_allclose(ext["seam_lr"], 1e-3 / STEPS, rtol=1e-12)  # the linear schedule's last step
    np.testing.assert_array_equal(t.learning_rate.numpy(slice(STEPS + 1, None)), np.float32(ext["seam_lr"]))
    assert t.config["run"]["steps"] == STEPS  # the original plan stays as it was
    # what info, report and compare show of it
    assert f"extension: steps {STEPS + 1}..{STEPS + 8}, lr policy hold" in "\n".join(display.config_summary(t.config))
    assert report.Run("ext", t, curves=None).seams == [STEPS + 1]
    assert wordystore.load_state(path)[2] == STEPS + 8

    with pytest.raises(ValueError, match=f"after the run's last step {STEPS + 8}"):
        run.extend(path, STEPS + 8, "decay")
    with pytest.raises(ValueError, match="unknown LR policy 'cosine'"):
        run.extend(path, STEPS + 9, "cosine")
