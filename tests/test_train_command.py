"""What `wordystore train` shows and says: the loss and learning rate each step used (as stored), the
Trainer's mean with its window, TensorBoard through the Trainer's own `report_to`, an existing store
refused at once, the rows a resume added, and a resume of a run that stopped before its first commit."""

import re
import subprocess
import sys

import numpy as np
from test_scripting import read_events

import wordystore
from trainer import run
from trainer.config import RunConfig
from wordystore.cli import main
from wordystore.recording import kinds_for

SMALL = dict(vocab_size=300, hidden_dim=8, batch_size=2, max_seq_len=16, bf16_matmul="native")


def test_the_lines_show_the_loss_and_learning_rate_stored_and_report_to_tensorboard_logs_the_run(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))  # the Trainer's own output_dir is temporary
    cfg = RunConfig(steps=4, training_args={"report_to": "tensorboard", "logging_steps": 2}, **SMALL)
    run.train(tmp_path / "run.zarr", cfg, progress=True)
    out, err = capsys.readouterr()  # the logged lines on stdout (tqdm.write), the bar on stderr
    t = wordystore.open(tmp_path / "run.zarr")
    stored, losses = t.learning_rate.numpy(), t.losses.float()[:].tolist()
    assert stored[1] == np.float32(1e-3)
    logged = re.findall(
        r"^step +(\d+)  loss ([\d.]+)  \(mean of steps (\d+)\.\.(\d+): ([\d.]+)\)  lr (\S+)$", out, re.M
    )
    assert [(int(step), int(first), int(last)) for step, _, first, last, _, _ in logged] == [(2, 1, 2), (4, 3, 4)]
    for step, loss, first, last, mean, lr in logged:
        assert loss == f"{losses[int(step)]:.4f}"  # the step's own loss, as the store holds it
        window = losses[int(first) : int(last) + 1]
        assert abs(float(mean) - sum(window) / len(window)) < 0.02 * float(mean)  # the Trainer's mean, unrounded
        assert float(lr) == float(f"{stored[int(step)]:.3e}")  # the rate the step used, not the next step's
    assert err.rstrip().rsplit("loss ", 1)[1].startswith(f"{losses[-1]:.4f} lr {stored[-1]:.3e} ")  # the bar
    assert out.splitlines()[0].startswith("bf16 matmul: native") and "Expect about" in out.splitlines()[0]
    events = read_events(tmp_path / "tb")
    assert [step for step, _ in events["train/loss"]] == [2, 4]


def test_training_into_an_existing_store_is_refused_before_anything_loads(tmp_path):
    path = tmp_path / "run.zarr"
    wordystore.create(path, kinds_for({}, None), config={}).close()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code = (
        "import sys; from wordystore.cli import main; status = main(sys.argv[1:]); "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules)); sys.exit(status)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "train", str(path), "--steps", "3"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stdout == "[]\n"  # refused before torch, transformers or the model loaded
    assert done.stderr.splitlines() == [
        f"wordystore train: error: {path} already holds a trajectory; --overwrite replaces it, --resume goes on "
        "with an interrupted run, --extend-to N --lr-policy P goes on past a finished one"
    ]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_the_summary_says_how_many_rows_a_resume_added():
    summary = dict(
        store="runs/a.zarr",
        rows=31,
        new_rows=12,
        start=18,
        steps=30,
        planned_steps=30,
        seconds=10.0,
        steps_per_second=1.2,
        store_bytes=5e6,
        n_trained=3,
        n_untrained=4,
    )
    assert run.main_summary(summary).startswith("recorded 12 new rows (steps 19..30; 31 in all) into runs/a.zarr in ")
    fresh = {**summary, "start": 0, "new_rows": 31}
    assert run.main_summary(fresh).startswith("recorded 31 rows (30 steps) into runs/a.zarr in ")


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
