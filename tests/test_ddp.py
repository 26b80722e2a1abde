"""Recording under DDP (gloo, 2 CPU processes through torchrun): rank 0 writes one store; the
gradient recorded is the all-reduced one the optimizer steps with; the loss is the mean over ranks;
and the run matches one process trained on the same global batches."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_loop import STEPS
from safetensors.torch import load_file
from test_recording import RECORDED, same_bits

import wordystore

HERE = Path(__file__).resolve().parent


def torchrun(nproc: int, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


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
