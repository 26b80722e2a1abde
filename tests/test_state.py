"""The run state of trainer.state: captured between two steps, through safetensors + JSON, restored into
a fresh Trainer, the run goes on bit for bit; extensions follow their named LR policy."""

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load, save
from transformers import TrainerCallback

from trainer import state as run_state
from trainer.config import RunConfig
from trainer.experiment import SeedTrainer, TokenDataset, build_model, checkpoint_directory, training_arguments

# 64 windows of 17 tokens, batch 4: an epoch is 16 steps, so 24 steps cross an epoch boundary
CFG = RunConfig(
    vocab_size=300, hidden_dim=8, batch_size=4, steps=24, max_seq_len=16, training_args={"neftune_noise_alpha": 5.0}
)  # NEFTune draws noise each step: the RNGs matter
IDS = np.random.default_rng(0).integers(0, 300, 80)


class Watch(TrainerCallback):
    """Every parameter and Adam moment after each step; the captured state at some steps."""

    def __init__(self, capture_at=()):
        self.trainer, self.capture_at = None, set(capture_at)
        self.steps, self.states = {}, {}

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lr = optimizer.param_groups[0]["lr"]  # the lr this step used

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        row = {n: p.detach().clone() for n, p in model.named_parameters()}
        for i, s in optimizer.state_dict()["state"].items():
            row.update({f"{i}.{k}": v.clone() for k, v in s.items()})
        row["lr"] = torch.tensor(self.lr, dtype=torch.float64)
        self.steps[state.global_step] = row
        if state.global_step in self.capture_at:
            self.states[state.global_step] = through_files(*run_state.capture(self.trainer))


def through_files(tensors, info):
    """The state as the store keeps it: safetensors bytes and a JSON text."""
    return load(save(tensors)), json.loads(json.dumps(info, allow_nan=False))


def run(tmp_path, max_steps, *, capture_at=(), resume=None, extension=None):
    torch.manual_seed(CFG.seed)
    np.random.seed(CFG.seed)
    model = build_model(CFG, 300, "cpu")
    watch = Watch(capture_at)
    args = training_arguments(CFG, str(tmp_path / "out"), "cpu", max_steps=max_steps)
    checkpoint = None if resume is None else checkpoint_directory(tmp_path / "resume", resume[1])
    trainer = SeedTrainer(
        model=model,
        args=args,
        train_dataset=TokenDataset(torch.tensor(IDS), 16),
        callbacks=[watch],
        resume_state=resume,
        extension=extension,
    )
    watch.trainer = trainer
    trainer.train(resume_from_checkpoint=checkpoint)
    return watch


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return run(tmp_path_factory.mktemp("full"), 24, capture_at=(5, 16, 19, 24))


@pytest.mark.parametrize("at", [5, 16, 19])  # mid-epoch, exactly at the epoch boundary, in the second epoch
def test_a_restored_run_goes_on_bit_for_bit(uninterrupted, tmp_path, at):
    resumed = run(tmp_path, 24, resume=uninterrupted.states[at])
    assert sorted(resumed.steps) == list(range(at + 1, 25))
    for step, row in resumed.steps.items():
        for name, value in row.items():
            assert torch.equal(value, uninterrupted.steps[step][name]), f"step {step}: {name} differs"


def test_the_state_holds_what_it_promises(uninterrupted):
    tensors, info = uninterrupted.states[19]
    assert info["global_step"] == 19 and info["data"] == {"epoch": 1, "samples_seen": 76}
    assert {"rng.torch_cpu", "model.transformer.wte.weight", "optimizer.0.exp_avg_sq", "optimizer.0.step"} <= set(
        tensors
    )
    assert "model.lm_head.weight" not in tensors  # tied to wte: stored once
    assert tensors["optimizer.0.step"].item() == 19
    assert info["lr_scheduler"]["last_epoch"] == 19 and info["optimizer"]["param_groups"][0]["betas"] == [0.9, 0.999]


def test_rng_state_round_trip():
    tensors, info = through_files(*run_state.rng_state())
    first = (random.random(), np.random.rand(), torch.rand(3))
    run_state.restore_rng(tensors, {"rng": info})
    assert (random.random(), np.random.rand()) == first[:2] and torch.equal(torch.rand(3), first[2])


def test_a_state_for_another_model_is_refused(uninterrupted):
    tensors, _ = uninterrupted.states[5]
    with pytest.raises(ValueError, match="missing .*unexpected"):
        run_state.restore_model(
            build_model(RunConfig(vocab_size=300, hidden_dim=8, n_layer=1), 300, "cpu"),
            {k.replace("h.1.", "h.9."): v for k, v in tensors.items()},
        )


@pytest.mark.parametrize("policy", ["hold", "decay", "restart"])
def test_extensions_follow_their_lr_policy_and_go_on_exactly_otherwise(uninterrupted, tmp_path, policy):
    tensors, info = uninterrupted.states[24]
    last_lr = uninterrupted.steps[24]["lr"].item()  # step 24's: 1e-3 / 24, the linear schedule's last
    extension = {"seam_step": 24, "to_step": 30, "lr_policy": policy, "seam_lr": last_lr}
    extended = run(tmp_path, 30, resume=(tensors, info), extension=extension)
    assert sorted(extended.steps) == list(range(25, 31))
    used = [extended.steps[s]["lr"].item() for s in range(25, 31)]
    expected = {
        "hold": [last_lr] * 6,
        "decay": [last_lr * (6 - i) / 6 for i in range(6)],
        "restart": [1e-3 * (6 - i) / 6 for i in range(6)],  # a fresh linear schedule over the 6 new steps
    }[policy]
    np.testing.assert_allclose(used, expected, rtol=1e-12)
    np.testing.assert_allclose(last_lr, 1e-3 / 24, rtol=1e-12)
