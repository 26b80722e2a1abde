"""What `wordystore train` shows and says: the learning rate each step used (as stored), TensorBoard
through the Trainer's own `report_to`, and a resume of a run that stopped before its first commit."""

import re

import numpy as np
from test_scripting import read_events

import wordystore
from trainer import run
from trainer.config import RunConfig
from wordystore.cli import main
from wordystore.recording import kinds_for

SMALL = dict(vocab_size=300, hidden_dim=8, batch_size=2, max_seq_len=16, bf16_matmul="native")


def test_the_bar_shows_the_learning_rate_stored_and_report_to_tensorboard_logs_the_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))  # the Trainer's own output_dir is temporary
    cfg = RunConfig(steps=3, training_args={"report_to": "tensorboard", "logging_steps": 1}, **SMALL)
    run.train(tmp_path / "run.zarr", cfg, progress=True)
    out, err = capsys.readouterr()  # the logged lines on stdout (tqdm.write), the bar on stderr
    stored = wordystore.open(tmp_path / "run.zarr").learning_rate.numpy()
    assert stored[1] == np.float32(1e-3)
    logged = [float(lr) for lr in re.findall(r"^step +\d+  loss [\d.]+  lr (\S+)$", out, re.M)]
    assert logged == [float(f"{lr:.3e}") for lr in stored[1:]]  # 1.000e-03 at step 1, not the next step's 6.667e-04
    assert err.rstrip().rsplit("lr ", 1)[1].startswith(f"{stored[-1]:.3e} ")  # the bar's last postfix
    events = read_events(tmp_path / "tb")
    assert [step for step, _ in events["train/loss"]] == [1, 2, 3]


def test_resume_of_a_run_stopped_before_its_first_commit_says_so_and_builds_nothing(tmp_path, capsys):
    path = tmp_path / "killed.zarr"
    cfg = RunConfig(steps=50, **SMALL)
    # what a run killed within its first block leaves: the store with its config, no committed row, no state
    wordystore.create(path, kinds_for({}, None), config={"run": cfg.to_dict(), "data": {}}).close()
    assert main(["train", str(path), "--resume"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"wordystore train: error: {path}: the run stopped before its first commit (the writer commits a block of "
        "steps, with the run's state, every few steps), so nothing of it was kept to go on from; start it again: "
        f"wordystore train {path} --overwrite, with the same flags"
    ]
