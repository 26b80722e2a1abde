"""Every user error the command line can meet: one line, ``wordystore <command>: error: ...``, exit
status 2, no traceback, nothing left behind. And what the numbers of ``export`` and the order of
``stitch`` mean."""

import os
import re
import resource
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file

import wordystore
from wordystore.cli import main
from wordystore.tools.safetensors_layout import STEP_KINDS, export

VOCAB = 10
SCALARS = dict(
    init_scale=0.02, learning_rate=1e-3, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, n_trained=4, n_untrained=6
)


def record(path, steps, n_trained=4):
    """A seed-layout trajectory whose every value is its training step."""
    kinds = {name: kind for name, kind in wordystore.seed_kinds(VOCAB, 2).items() if name in STEP_KINDS}
    sets = {"trained": np.arange(n_trained), "untrained": np.arange(n_trained, VOCAB)}
    with wordystore.create(
        path, kinds, token_sets=sets, config={"seed_scalars": SCALARS}, block_rows=2, chunk_rows=4
    ) as w:
        for step in steps:
            w.append(step, **{name: torch.full(kind.shape, float(step)).bfloat16() for name, kind in kinds.items()})
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``a``: steps 0-5; ``b``: its continuation, recording step 5 again, to 11; ``inside``: steps 1-3;
    ``empty``: no steps; ``other-sets``: steps 6-7 with other token sets."""
    tmp = tmp_path_factory.mktemp("cli")
    record(tmp / "a.zarr", range(6))
    record(tmp / "b.zarr", range(5, 12))
    record(tmp / "inside.zarr", range(1, 4))
    record(tmp / "empty.zarr", [])
    record(tmp / "other-sets.zarr", range(6, 8), n_trained=5)
    zarr.open_group(tmp / "plain.zarr", mode="w")
    (tmp / "junk").write_bytes(b"not a safetensors file")
    (tmp / "bad.json").write_text('{"steps": 1')
    (tmp / "device.json").write_text('{"device": "gpu"}')
    (tmp / "adir").mkdir()
    return tmp


def user_error(capsys, *args) -> str:
    """Run the CLI, expecting a user error; return its one line (after checking it is one line)."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0]


# -- the common mistakes, and their kin ---------------------------------------------------------------------

CASES = [
    (
        ["info", "{plain.zarr}"],
        r"^wordystore info: error: .*plain.zarr is a zarr group but not a wordystore trajectory",
    ),
    (["info", "{missing.zarr}"], r"no trajectory at .*missing.zarr"),
    (["info"], r"^wordystore info: error: the following arguments are required: store \(see wordystore info --help\)"),
    (
        ["export", "{a.zarr}", "{out}", "--tokens", "nosuch"],
        r"no token set 'nosuch'; this trajectory has \['trained', 'untrained'\]",
    ),
    (
        ["export", "{a.zarr}", "{out}", "--tokens", "-1"],
        r"token ids \[-1\] are outside the vocabulary; expected ids in \[0, 10\)",
    ),
    (["export", "{a.zarr}", "{out}", "--tokens", "1,a"], r"argument --tokens: expected a token-set name .* got '1,a'"),
    (["export", "{a.zarr}", "{out}", "--tokens", "1,99999"], r"token ids \[99999\] are outside the vocabulary"),
    (
        ["export", "{a.zarr}", "{out}", "--steps", "1:2:3:4"],
        r"argument --steps: expected N, START:STOP, START:STOP:STRIDE or N,N,...; got '1:2:3:4'",
    ),
    (["export", "{a.zarr}", "{out}", "--steps", "1::0"], r"the stride of '1::0' is 0; expected a non-zero stride"),
    (
        ["export", "{a.zarr}", "{out}", "--steps", "10:2"],
        r"steps 10:2 select nothing; the trajectory has 6 rows, training steps 0\.\.5",
    ),
    (["export", "{a.zarr}", "{out}", "--rows", "10:2"], r"rows 10:2 select nothing"),
    (
        ["export", "{a.zarr}", "{out}", "--steps", "99"],
        r"training step\(s\) \[99\] not recorded; this trajectory records 6 steps, 0\.\.5",
    ),
    (["export", "{a.zarr}", "{out}", "--rows", "1,99"], r"rows \[1, 99\] are out of range; the trajectory has 6 rows"),
    (
        ["export", "{a.zarr}", "{out}", "--steps", "1", "--rows", "1"],
        r"argument --rows: not allowed with argument --steps",
    ),
    (["export", "{a.zarr}", "{out}", "--kinds", "embeddings,nosuch"], r"kinds \['nosuch'\] are not in the trajectory"),
    (
        ["export", "{a.zarr}", "{adir}", "--overwrite"],
        r"adir is a directory; expected the path of a .safetensors file to write",
    ),
    (
        ["export", "{a.zarr}", "{missing}/out.safetensors"],
        r"cannot write .*missing/out.safetensors: directory .*missing does not exist$",
    ),
    (["export", "{a.zarr}", "{junk}"], r"junk exists; pass overwrite=True \(--overwrite\) to replace it"),
    (
        ["train", "{out}", "--config", "{adir}"],
        r"--config .*adir is a directory; expected a JSON file of run parameters",
    ),
    (["train", "{out}", "--config", "{bad.json}"], r"--config .*bad.json is not JSON \(.*\); expected a JSON object"),
    (["train", "{out}", "--config", "{missing.json}"], r"--config .*missing.json does not exist"),
    (
        ["train", "{out}", "--token-masks", "{junk}"],
        r"--token-masks .*junk is not a readable safetensors file \(.*\); expected the notebook's token-mask file",
    ),
    (["train", "{out}", "--device", "nosuch"], r"--device 'nosuch' is not a device; expected cpu, cuda, cuda:N or mps"),
    (["train", "{out}", "--training-arg", "junk"], r"--training-arg 'junk': expected KEY=VALUE"),
    (
        ["train", "{out}", "--training-arg", "lr_schedler_type=constant"],
        r"'lr_schedler_type' is not a Hugging Face TrainingArguments field; did you mean lr_scheduler_type",
    ),
    (
        ["train", "{out}", "--corpus", "{missing.txt}"],
        r"--corpus .*missing.txt does not exist; expected a UTF-8 text file",
    ),
    (
        ["train", "{out}", "--config", "{device.json}"],
        r"--config .*device.json: 'device' 'gpu' is not a device; expected cpu",
    ),
    (["train", "{out}", "--steps", "abc"], r"argument --steps: invalid int value: 'abc'"),
    (
        ["train", "{a.zarr}"],
        r"a.zarr already holds a trajectory; --overwrite replaces it, --resume goes on with an interrupted run, "
        r"--extend-to N --lr-policy P goes on past a finished one$",
    ),
    (["info", "{missing}/run.zarr"], r"no trajectory at .*missing/run.zarr: no such directory$"),
    (["info", "{adir}"], r"no trajectory at .*adir: it has no zarr.json$"),
    (["import", "{junk}", "{out}"], r"junk is not a readable safetensors file"),
    (
        ["import", "{junk}", "{out}", "--token-masks", "{junk}"],
        r"--token-masks .*junk is not a readable safetensors file",
    ),
    (["stitch", "{a.zarr}", "{out}"], r"stitch needs at least two trajectories, got 1"),
    (
        ["stitch", "{a.zarr}", "{inside.zarr}", "{out}"],
        r"inside.zarr \(steps 1\.\.3\) adds no step after .*a.zarr \(steps 0\.\.5\)",
    ),
    (["stitch", "{a.zarr}", "{a.zarr}", "{out}"], r"a.zarr \(steps 0\.\.5\) adds no step after"),
    (["stitch", "{a.zarr}", "{b.zarr}", "{a.zarr}", "--overwrite"], r"the output .*a.zarr is also a source"),
    (["stitch", "{a.zarr}", "{plain.zarr}", "{out}"], r"plain.zarr is a zarr group but not a wordystore trajectory"),
    (
        ["stitch", "{a.zarr}", "{b.zarr}", "{inside.zarr}"],
        r"inside.zarr already holds a zarr store; pass overwrite=True",
    ),
    (["stitch", "{a.zarr}", "{empty.zarr}", "{out}"], r"empty.zarr has no recorded rows; nothing to stitch from it"),
    (
        ["stitch", "{a.zarr}", "{other-sets.zarr}", "{out}"],
        r"cannot stitch .*other-sets.zarr onto .*a.zarr: their token sets differ",
    ),
    (["nosuch"], r"^wordystore: error: argument command: invalid choice: 'nosuch'"),
]


def resolve(arg: str, runs, tmp_path) -> str:
    """``{name}``: a path, in this test's directory for ``out`` and ``missing``, else among the runs."""
    return re.sub(r"\{([^}]+)\}", lambda m: str((tmp_path if m[1] in ("out", "missing") else runs) / m[1]), arg)


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_user_errors_are_one_line_with_exit_status_2(runs, tmp_path, capsys, args, message):
    before = sorted(runs.rglob("*"))
    line = user_error(capsys, *(resolve(a, runs, tmp_path) for a in args))
    assert re.search(message, line), line
    assert sorted(runs.rglob("*")) == before and list(tmp_path.iterdir()) == []  # nothing made, nothing changed


def test_a_locked_store_is_a_user_error(runs, tmp_path, capsys):
    locked = record(tmp_path / "locked.zarr", [0, 1])
    with wordystore.resume(locked):
        line = user_error(capsys, "stitch", runs / "a.zarr", runs / "b.zarr", locked, "--overwrite")
    assert re.search(rf"locked.zarr is open for writing by another writer \(pid {os.getpid()}\)", line), line
    assert wordystore.open(locked).steps.tolist() == [0, 1]


def test_a_corrupt_chunk_met_during_export_is_a_user_error_and_leaves_no_file(runs, tmp_path, capsys):
    shutil.copytree(runs / "a.zarr", tmp_path / "a.zarr")
    shard = tmp_path / "a.zarr" / "embeddings" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[5] ^= 0xFF
    shard.write_bytes(bytes(data))
    line = user_error(capsys, "export", tmp_path / "a.zarr", tmp_path / "out.safetensors")
    assert re.search(r"corrupt chunk: array 'embeddings' chunk \(0, 0, 0\) .* of .*a.zarr", line), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zarr"]


def test_debug_shows_the_traceback_too(runs, capsys, monkeypatch):
    for args in (["--debug", "info", runs / "plain.zarr"], ["info", runs / "plain.zarr", "--debug"]):
        assert main([str(a) for a in args]) == 2
        err = capsys.readouterr().err
        assert (
            "Traceback" in err and "FormatError" in err and err.splitlines()[-1].startswith("wordystore info: error:")
        )
    monkeypatch.setenv("WORDYSTORE_DEBUG", "1")
    assert main(["info", str(runs / "plain.zarr")]) == 2 and "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("WORDYSTORE_DEBUG", "0")
    assert main(["info", str(runs / "plain.zarr")]) == 2 and "Traceback" not in capsys.readouterr().err


def test_a_bug_is_one_line_too_but_says_so_with_exit_status_1(runs, capsys, monkeypatch):
    def broken_info(ns):
        raise RuntimeError("an invariant broke")

    monkeypatch.setattr("wordystore.cli.cmd_info", broken_info)  # a stand-in for a bug in a command
    assert main(["info", str(runs / "a.zarr")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "wordystore info: error: internal error, RuntimeError: an invariant broke"
    )
    assert "WORDYSTORE_DEBUG=1" in err


def run_cli(*args, **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "wordystore.cli", *map(str, args)], env=env, capture_output=True, text=True, **popen
    )


def test_a_closed_pipe_ends_quietly(runs):
    """``wordystore info STORE | head``: the reader goes away before the output is written."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "wordystore.cli", "info", str(runs / "a.zarr"), "--config"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and err == ""


def limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (1500, 1500))  # SIGXFSZ is ignored by Python: writes fail with EFBIG


def test_a_write_refused_by_the_system_names_the_output_and_leaves_nothing(runs, tmp_path):
    proc = run_cli("export", runs / "a.zarr", tmp_path / "out.safetensors", preexec_fn=limit_file_size)
    assert proc.returncode == 2, proc.stderr
    assert (
        proc.stderr.splitlines()[-1]
        == f"wordystore export: error: cannot write {tmp_path / 'out.safetensors'}: File too large"
    )
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def full_disk(small_tmpfs):
    """A 4 KiB tmpfs (conftest.small_tmpfs): a real ENOSPC."""
    return small_tmpfs("4k", "the EFBIG test above covers the same path")


def test_a_full_disk_during_export_names_the_output_and_leaves_nothing(tmp_path, full_disk):
    big = record(tmp_path / "big.zarr", range(40))
    proc = run_cli("export", big, full_disk / "out.safetensors")
    assert proc.returncode == 2, proc.stderr
    assert (
        proc.stderr.splitlines()[-1]
        == f"wordystore export: error: cannot write {full_disk / 'out.safetensors'}: No space left on device"
    )
    assert list(full_disk.iterdir()) == []


# -- export: training steps or rows -------------------------------------------------------------------


@pytest.mark.parametrize(
    "selection, steps",
    [
        ([], [0, 10, 20, 30, 40]),
        (["--steps", "10:30"], [10, 20, 30]),  # training steps, both ends included (as .loc)
        (["--steps", "15:25"], [20]),  # ends need not be recorded steps
        (["--steps", "20"], [20]),  # one step, not "the first 20 rows"
        (["--steps", "0:40:2"], [0, 20, 40]),  # every 2nd row
        (["--steps", "40,0"], [40, 0]),
        (["--steps", "::-1"], [40, 30, 20, 10, 0]),
        (["--rows", "1:3"], [10, 20]),  # rows, a python slice
        (["--rows=-2:"], [30, 40]),
        (["--rows", "0"], [0]),
    ],
)
def test_export_selects_training_steps_or_rows(tmp_path, capsys, selection, steps):
    store = record(tmp_path / "sparse.zarr", [0, 10, 20, 30, 40])
    assert main(["export", str(store), str(tmp_path / "out.safetensors"), *selection]) == 0
    data = load_file(str(tmp_path / "out.safetensors"))
    assert data["recorded_steps"].tolist() == steps
    assert data["embeddings"][:, 3, 1].float().tolist() == steps  # the rows of those steps, not others


def test_export_api_takes_steps_or_rows_not_both(runs, tmp_path):
    path = export(runs / "a.zarr", tmp_path / "x.safetensors", steps=slice(2, 4), progress=False)
    assert load_file(str(path))["recorded_steps"].tolist() == [2, 3, 4]
    with pytest.raises(ValueError, match="give rows or steps, not both"):
        export(runs / "a.zarr", tmp_path / "y.safetensors", rows=slice(0, 2), steps=slice(0, 2), progress=False)


# -- stitch: the order of the runs, and --overwrite -----------------------------------------------------


def test_stitch_joins_runs_in_step_order_whatever_order_they_are_given(runs, tmp_path, capsys):
    for order in (["a.zarr", "b.zarr"], ["b.zarr", "a.zarr"]):
        out = tmp_path / "-".join(order)
        assert main(["stitch", *(str(runs / name) for name in order), str(out)]) == 0
        t = wordystore.open(out)
        assert t.steps.tolist() == list(range(12))
        assert t.losses[:].float().tolist() == list(range(12))
        assert [(s["source"], s["steps"], s["dropped_repeated_steps"]) for s in t.segments] == [
            (str(runs / "a.zarr"), [0, 5], 0),
            (str(runs / "b.zarr"), [6, 11], 1),
        ]


def test_stitch_overwrite_replaces_an_existing_output(runs, tmp_path, capsys):
    out = record(tmp_path / "out.zarr", [100, 101, 102])
    assert user_error(capsys, "stitch", runs / "a.zarr", runs / "b.zarr", out).endswith(
        "already holds a zarr store; pass overwrite=True (--overwrite) to replace it"
    )
    assert wordystore.open(out).steps.tolist() == [100, 101, 102]
    assert main(["stitch", str(runs / "a.zarr"), str(runs / "b.zarr"), str(out), "--overwrite"]) == 0
    assert wordystore.open(out).steps.tolist() == list(range(12))
