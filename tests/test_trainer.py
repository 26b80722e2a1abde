"""The project's trainer against the notebook's own recorder, reimplemented in notebook_reference."""

import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
from notebook_reference import NotebookParameters, run_notebook

from trainer.cli import _run_overrides
from trainer.config import RunConfig
from trainer.experiment import load_corpus, load_tokenizer, tokenize_cached
from trainer.memory import jemalloc_library
from trainer.run import train
from wordystore import trajectory
from wordystore.cli import build_parser
from wordystore.cli import main as cli_main

# native: the notebook's own kernels, so that the runs can be bit-identical to it
SHAPE = dict(vocab_size=512, hidden_dim=16, batch_size=4, steps=6, max_seq_len=32)
SMALL = dict(**SHAPE, bf16_matmul="native")
SEED_KINDS = ("recorded_steps", "embeddings", "grads", "momentum", "variance", "logits", "losses")


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    cfg = RunConfig(**SMALL)
    train(tmp / "ours.zarr", cfg, progress=False)
    ids = tokenize_cached(load_corpus(), load_tokenizer()) % SMALL["vocab_size"]
    reference = run_notebook(NotebookParameters(**SHAPE), ids, str(tmp / "nb"))
    return trajectory.open(tmp / "ours.zarr"), reference


def test_recorded_tensors_are_bit_identical_to_the_notebook(small_runs):
    t, reference = small_runs
    assert len(t) == SMALL["steps"] + 1
    np.testing.assert_array_equal(t.steps, reference["recorded_steps"].numpy())
    for kind in SEED_KINDS[1:]:
        ours, theirs = t[kind][:], reference[kind]
        assert ours.dtype == theirs.dtype == torch.bfloat16, kind
        assert torch.equal(ours.view(torch.int16), theirs.view(torch.int16)), f"{kind} differs from the notebook"


def test_training_moved_the_embeddings_and_lowered_nothing_silently(small_runs):
    t, _ = small_runs
    assert not torch.equal(t.embeddings[0], t.embeddings[-1])
    assert torch.isnan(t.losses[0].float()) and torch.isfinite(t.losses[1:].float()).all()
    assert (t.grads[0] == 0).all() and (t.grads[1] != 0).any()


def test_extra_scalars_and_the_resolved_config(small_runs):
    t, _ = small_runs
    lr = t.learning_rate[1:].numpy()
    steps = SMALL["steps"]
    # the Trainer's inherited default: linear decay to 0 at max_steps, no warmup
    expected = 1e-3 * (1 - np.arange(steps) / steps)
    np.testing.assert_allclose(lr, expected, rtol=1e-6)
    pre, post = t.grad_norm[1:].numpy(), t.grad_norm_clipped[1:].numpy()
    # clipping scales bfloat16 gradients, each rounded again to bfloat16: relative error up to 2**-8
    assert (pre > 0).all() and (post <= np.minimum(pre, 1.0) * (1 + 2**-8)).all()
    args = t.config["training_arguments"]
    assert args["lr_scheduler_type"] == "linear" and args["max_grad_norm"] == 1.0 and args["max_steps"] == steps
    assert t.config["run"]["steps"] == steps and t.config["data"]["vocab_size"] == SMALL["vocab_size"]
    assert "torch" in t.metadata["versions"] and t.metadata["format_version"] == 4


def test_token_sets_partition_the_vocabulary_by_corpus_occurrence(small_runs):
    t, _ = small_runs
    ids = tokenize_cached(load_corpus(), load_tokenizer()) % SMALL["vocab_size"]
    np.testing.assert_array_equal(t.token_sets["trained"], np.unique(ids))
    assert len(t.token_sets["trained"]) + len(t.token_sets["untrained"]) == SMALL["vocab_size"]


def test_record_every_n_keeps_step_numbers(tmp_path):
    cfg = RunConfig(**{**SMALL, "steps": 4, "record_every": 2})
    train(tmp_path / "every2.zarr", cfg, progress=False)
    t = trajectory.open(tmp_path / "every2.zarr")
    np.testing.assert_array_equal(t.steps, [0, 2, 4])
    assert torch.equal(t.embeddings.loc[4], t.embeddings[-1])


def test_gpt2_tokenizer_offline():
    assert load_tokenizer().encode("Hello world") == [15496, 995]


def test_cli_end_to_end_with_the_real_gpt2_vocabulary_and_the_memory_setting_changes_no_bit(tmp_path):
    """The command's default reuses freed memory (trainer.memory.reuse_freed_memory: jemalloc where it
    is found, else glibc's heap kept); --low-memory does not. With the real vocabulary the [4, 128,
    50257] float32 logits (103 MB) are big enough that glibc would otherwise map and unmap them each step."""
    settings = [("default", [], {}), ("low_memory", ["--low-memory"], {})]
    if jemalloc_library() is not None:  # the default was jemalloc: glibc's kept heap too
        settings.append(("glibc", [], {"WORDYSTORE_JEMALLOC": "none"}))
    runs = {}
    for name, extra, env in settings:
        out = tmp_path / f"{name}.zarr"
        cmd = [
            sys.executable,
            "-m",
            "wordystore.cli",
            "train",
            str(out),
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--quiet",
            *extra,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, **env})
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""  # the seed's own job, quiet: no warning of any library, no notice
        first, *_, last = result.stdout.splitlines()
        assert first.startswith("bf16 matmul: ") and ". Expect about " in first
        assert last.startswith("recorded 3 rows (2 steps)")
        runs[name] = trajectory.open(out)
    t = runs["default"]
    for name in runs.keys() - {"default"}:
        for kind in t.kinds:
            assert t[kind].numpy(slice(None)).tobytes() == runs[name][kind].numpy(slice(None)).tobytes(), (name, kind)
    untrained = t.embeddings[0:3, "untrained"]
    assert untrained.shape == (3, 45087, 64) and untrained.dtype == torch.bfloat16
    assert t.config["model"]["vocab_size"] == 50257
    info = subprocess.run(
        [sys.executable, "-m", "wordystore.cli", "info", str(tmp_path / "default.zarr")], capture_output=True, text=True
    )
    assert "untrained (45087)" in info.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{name}.zarr" for name in runs)  # nothing else


STEP_LIKE_ALLOCATIONS = """
import resource, sys, torch
from trainer.memory import keep_freed_memory, reuse_freed_memory
setting = sys.argv[1]
assert setting == "default" or (keep_freed_memory() if setting == "glibc" else reuse_freed_memory(True) == setting)
faults = []
for step in range(20):  # big blocks allocated and freed in the same order each time, as a training step does
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.ones(16 << 20); b = a.bfloat16(); c = a * 2; del a; c.sum(); del b, c
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[1:]))
"""


def step_faults(setting: str) -> int:
    """Minor page faults of 19 step-like repetitions in a process of its own, reusing freed memory by ``setting``."""
    result = subprocess.run(
        [sys.executable, "-c", STEP_LIKE_ALLOCATIONS, setting], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="keep_freed_memory works on glibc")
def test_keep_freed_memory_reuses_freed_blocks_instead_of_faulting_them_in_again():
    # default: every repetition maps its 160 MB afresh (about 41,000 faults); kept: a few heap extensions
    default, kept = step_faults("default"), step_faults("glibc")
    assert kept < default / 4, (default, kept)


@pytest.mark.skipif(jemalloc_library() is None, reason="no jemalloc (Debian: libjemalloc2; or WORDYSTORE_JEMALLOC)")
def test_jemalloc_is_preloaded_by_a_reexec_and_reuses_freed_blocks():
    # the script asserts that it runs under jemalloc after its re-exec, then counts the faults
    default, reused = step_faults("default"), step_faults("jemalloc")
    assert reused < default / 4, (default, reused)


def test_a_jemalloc_path_that_names_no_file_is_refused_in_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORDYSTORE_JEMALLOC", str(tmp_path / "libjemalloc.so.2"))
    assert cli_main(["train", str(tmp_path / "x.zarr"), "--steps", "1", "--vocab-size", "64"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"wordystore train: error: WORDYSTORE_JEMALLOC={tmp_path / 'libjemalloc.so.2'}: no such file; "
        "expected the path of libjemalloc.so.2, or none\n"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--steps", "0"], "steps must be >= 1, got 0"),
        (["--steps", "-1"], "steps must be >= 1, got -1"),
        (["--record-every", "0"], "record_every must be >= 1, got 0"),
        (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
        (["--hidden-dim", "63"], "hidden_dim (63) must be a multiple of n_head (2)"),
        (["--resume", "--overwrite"], "--overwrite starts a new run"),
        (["--extend-to", "300"], "--extend-to N and --lr-policy (hold, decay, restart) go together"),
    ],
)
def test_bad_train_flags_are_refused_up_front_and_leave_nothing(tmp_path, capsys, flags, message):
    assert cli_main(["train", str(tmp_path / "x.zarr"), *flags]) == 2
    err = capsys.readouterr().err
    assert err == f"wordystore train: error: {message}\n" or err.startswith(f"wordystore train: error: {message}")
    assert len(err.splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_flags_take_their_type_from_the_run_config(tmp_path):
    (tmp_path / "c.txt").write_text("a corpus")
    corpus = str(tmp_path / "c.txt")
    ns = build_parser().parse_args(["train", "x", "--vocab-size", "300", "--learning-rate", "1e-2", "--corpus", corpus])
    assert (ns.vocab_size, ns.learning_rate, ns.corpus) == (300, 0.01, corpus)
    config = RunConfig.from_dict(_run_overrides(ns))
    assert config.vocab_size == 300 and config.learning_rate == 0.01
    # a --config file gives only what it sets (a resumed run's stored values fill the rest), flags win
    (tmp_path / "c.json").write_text(json.dumps({"steps": 5, "seed": 1}))
    ns = build_parser().parse_args(["train", "x", "--config", str(tmp_path / "c.json"), "--seed", "3"])
    assert _run_overrides(ns) == {"steps": 5, "seed": 3}


def test_config_file_with_an_unknown_key_is_refused(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"stepz": 3}))
    with pytest.raises(ValueError, match="stepz"):
        RunConfig.from_file(path)
