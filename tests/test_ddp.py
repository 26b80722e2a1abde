"""Recording under DDP (gloo, 2 CPU processes through torchrun): rank 0 writes one store; the
gradient recorded is the all-reduced one the optimizer steps with; the loss is the mean over ranks;
and the run matches one process trained on the same global batches."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from ddp_loop import STEPS
from safetensors.torch import load_file
from test_recording import RECORDED, same_bits
from test_resume import assert_same_bits, committed_rows

import wordystore
from wordystore.cli import main

HERE = Path(__file__).resolve().parent
WORDYSTORE = str(Path(sys.executable).parent / "wordystore")  # the console script, as torchrun --no-python runs it
TINY = ["--steps", "10", "--vocab-size", "300", "--hidden-dim", "8", "--max-seq-len", "16", "--bf16-matmul", "native"]


def run(command: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def torchrun_command(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    return run(torchrun_command(nproc, *args))


@pytest.fixture(scope="module")
def loops(tmp_path_factory):
    """The plain loop on 2 ranks and on 1, on the same global batches."""
    tmp = tmp_path_factory.mktemp("ddp")
    for nproc in (2, 1):
        done = torchrun(nproc, str(HERE / "ddp_loop.py"), str(tmp / f"ranks{nproc}.zarr"))
        assert done.returncode == 0, done.stderr[-4000:]
    return tmp


def test_rank_0_records_the_all_reduced_gradient_the_optimizer_took(loops):
    t = wordystore.open(loops / "ranks2.zarr")
    assert t.steps.tolist() == list(range(STEPS + 1))
    ranks = [load_file(str(loops / f"ranks2.zarr.rank{r}.safetensors")) for r in (0, 1)]
    moved_by_the_reduce = False
    for step in range(1, STEPS + 1):
        for name in RECORDED:
            grad = ranks[0][f"{step}.{name}.grad"]
            assert same_bits(ranks[1][f"{step}.{name}.grad"], grad)  # all-reduced: one gradient for all ranks
            assert same_bits(t[f"{name}.grad"][step], grad), f"{name}.grad at step {step}"
            moved_by_the_reduce |= not torch.equal(ranks[0][f"{step}.{name}.local_grad"], grad)
            for kind in (name, f"{name}.exp_avg", f"{name}.exp_avg_sq"):
                assert same_bits(t[kind][step], ranks[0][f"{step}.{kind}"]), f"{kind} at step {step}"
        losses = [r[f"{step}.loss"].item() for r in ranks]
        assert t.losses[step].item() == pytest.approx(sum(losses) / 2, rel=1e-6)  # the mean over ranks
    assert moved_by_the_reduce  # the recorded gradient is not rank 0's own half of it


def test_two_ranks_record_what_one_process_does_on_the_same_global_batch(loops):
    two, one = wordystore.open(loops / "ranks2.zarr"), wordystore.open(loops / "ranks1.zarr")
    assert sorted(two.kinds) == sorted(one.kinds)
    for kind in two.kinds:
        a, b = two[kind][:], one[kind][:]
        assert a.dtype == b.dtype and a.shape == b.shape, kind
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite), kind
        # the same sums in another order: equal up to float32 rounding, carried through Adam's steps
        scale = b[finite].abs().max().item()
        torch.testing.assert_close(a[finite], b[finite], rtol=0, atol=1e-4 * scale, msg=kind)
    assert not math.isnan(two.grad_norm[1].item())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``wordystore train`` on 2 ranks of 2 sequences each, and in one process on batches of 4."""
    tmp = tmp_path_factory.mktemp("train")
    done = torchrun(2, "--no-python", WORDYSTORE, "train", str(tmp / "ddp.zarr"), "--batch-size", "2", *TINY)
    assert done.returncode == 0, done.stderr[-4000:]
    one = run([WORDYSTORE, "train", str(tmp / "one.zarr"), "--batch-size", "4", *TINY])
    assert one.returncode == 0, one.stderr[-4000:]
    return tmp, done


def test_torchrun_wordystore_train_records_one_store_as_one_process_would(trained):
    tmp, done = trained
    summaries = [line for line in done.stdout.splitlines() if line.startswith("recorded ")]
    assert len(summaries) == 1 and summaries[0].startswith(f"recorded 11 rows (10 steps) into {tmp / 'ddp.zarr'} ")
    assert main(["verify", str(tmp / "ddp.zarr")]) == 0
    two, one = wordystore.open(tmp / "ddp.zarr"), wordystore.open(tmp / "one.zarr")
    assert two.config["ranks"] == 2 and "ranks" not in one.config
    assert two.steps.tolist() == one.steps.tolist() == list(range(11))
    for kind in one.kinds:
        a, b = two[kind][:].double(), one[kind][:].double()
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite), kind
        # bfloat16 sums in another order (the all-reduce's): a few ulps of the kind's scale
        scale = b[finite].abs().max().item()
        torch.testing.assert_close(a[finite], b[finite], rtol=0, atol=0.02 * scale, msg=kind)


def test_the_momentum_of_two_ranks_is_predicted_exactly_from_the_recorded_gradient(trained):
    """The replay of AdamW from the recorded gradients and norms gives the recorded moments: the
    gradient recorded is the one the optimizer stepped with (after the all-reduce), as in one process."""
    tmp, _ = trained
    t = wordystore.open(tmp / "ddp.zarr")
    prediction = t.predictions["momentum"]
    residuals = prediction.residuals(t.momentum.numpy(), [t.grads.numpy(), t.grad_norm.numpy()])
    exact = 1 - np.count_nonzero(residuals[1:]) / residuals[1:].size
    assert exact >= 0.95, exact


def test_a_rank_killed_fails_the_run_with_one_line_and_resume_goes_on_bit_for_bit(tmp_path):
    steps = ["--steps", "80", *TINY[2:], "--batch-size", "2", "--quiet"]
    full, part = tmp_path / "full.zarr", tmp_path / "part.zarr"
    done = torchrun(2, "--no-python", WORDYSTORE, "train", str(full), *steps)
    assert done.returncode == 0, done.stderr[-4000:]

    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    command = torchrun_command(2, "--no-python", WORDYSTORE, "train", str(part), *steps)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while committed_rows(part) < 8:
        assert proc.poll() is None, f"the run ended before 8 rows: {proc.communicate()}"
        time.sleep(0.01)
    (rank_1,) = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
    rank_1.kill()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    # the ranks and torchrun write to one pipe: split on the command's prefix, not on lines
    assert [(x.strip().splitlines() or [""])[0] for x in err.split("wordystore train: ")[1:]] == [
        "error: rank 0: another rank of the run stopped (the connection to it broke); the store "
        "keeps its committed steps: go on with torchrun --nproc-per-node 2 --no-python wordystore train "
        f"{part} --resume"
    ], err[-4000:]
    assert committed_rows(part) < 81

    # Ctrl-C to one rank: every rank stops at the same step, which rank 0 commits with the run's state
    proc = subprocess.Popen(
        torchrun_command(2, "--no-python", WORDYSTORE, "train", str(part), "--resume", "--quiet"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    rows = committed_rows(part)
    while committed_rows(part) <= rows:
        assert proc.poll() is None, f"the run ended before a new commit: {proc.communicate()}"
        time.sleep(0.01)
    (rank_1,) = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
    rank_1.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    stopped_at = int(wordystore.open(part).steps[-1])
    assert stopped_at < 80, err[-4000:]
    assert wordystore.load_state(part)[2] == stopped_at
    assert f"go on with: torchrun --nproc-per-node 2 --no-python wordystore train {part} --resume" in out

    resumed = torchrun(2, "--no-python", WORDYSTORE, "train", str(part), "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert_same_bits(full, part)
    one_rank = run([WORDYSTORE, "train", str(part), "--extend-to", "90", "--lr-policy", "hold"])
    assert one_rank.returncode == 2
    assert "was recorded on 2 rank(s) and this run has 1" in one_rank.stderr


def test_a_store_rank_0_cannot_create_stops_every_rank_with_a_line_each(trained):
    tmp, _ = trained
    # an existing store: every rank refuses it before loading anything, in the command's one line
    before = wordystore.open(tmp / "ddp.zarr").commit_record
    done = torchrun(2, "--no-python", WORDYSTORE, "train", str(tmp / "ddp.zarr"), "--batch-size", "2", *TINY)
    assert done.returncode != 0
    said = [(x.strip().splitlines() or [""])[0] for x in done.stderr.split("wordystore train: ")[1:]]
    assert len(said) == 2 and all(x.startswith(f"error: {tmp / 'ddp.zarr'} already holds a trajectory") for x in said)
    assert wordystore.open(tmp / "ddp.zarr").commit_record == before
    # a place rank 0 cannot create a store in: rank 0 says why, the other rank that it stops
    (tmp / "a-file").write_text("not a directory")
    out = tmp / "a-file" / "run.zarr"
    done = torchrun(2, "--no-python", WORDYSTORE, "train", str(out), "--batch-size", "2", *TINY)
    assert done.returncode != 0
    # two processes write to one pipe: their lines may interleave, so split on the command's prefix
    said = sorted((x.strip().splitlines() or [""])[0] for x in done.stderr.split("wordystore train: ")[1:])
    assert len(said) == 2 and said[0].startswith(f"error: {out}: ")
    assert said[1] == "error: rank 1: rank 0 could not open the store (its error says why); stopping"
    assert (tmp / "a-file").read_text() == "not a directory"
