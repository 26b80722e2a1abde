"""The command line in scripts and shells: quick help with real text, --version, --json, --quiet and
progress bars on a terminal only, shell completion, export-scalars to TensorBoard, and what the
export/import round trip keeps."""

import fcntl
import io
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import wordystore
from wordystore.cli import build_parser, main
from wordystore.errors import RoundTripWarning
from wordystore.optional import install_hint
from wordystore.tools.safetensors_layout import COUNT_SCALARS, FLOAT_SCALARS, STEP_KINDS, export, import_seed_file

VOCAB, DIM = 12, 2
NOTEBOOK_TENSORS = {"recorded_steps", *STEP_KINDS, *FLOAT_SCALARS, *COUNT_SCALARS}
SCALARS = dict(
    init_scale=0.02, learning_rate=1e-3, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, n_trained=5, n_untrained=7
)


def record(path, steps, extra_kinds=()):
    """A seed-layout store with the trainer's scalar kinds (row 0's NaN, as the trainer records) and
    ``extra_kinds``, 2-d kinds the notebook's layout has no place for."""
    kinds = wordystore.seed_kinds(VOCAB, DIM)
    kinds.update(
        learning_rate=wordystore.Kind((), "float32", ()),
        grad_norm=wordystore.Kind((), "float32", ()),
        grad_norm_clipped=wordystore.Kind((), "float32", ()),
    )
    kinds.update({name: wordystore.Kind((3, 3), "float32", None) for name in extra_kinds})
    kinds = {k: v for k, v in kinds.items() if k in STEP_KINDS or v.shape == () or k in extra_kinds}
    sets = {"trained": np.arange(5), "untrained": np.arange(5, VOCAB)}
    config = {"seed_scalars": SCALARS, "run": {"note": "a config that travels"}}
    rng = np.random.default_rng(0)
    with wordystore.create(path, kinds, token_sets=sets, config=config, block_rows=2, chunk_rows=4) as w:
        for i, step in enumerate(steps):
            values = {
                name: torch.from_numpy(rng.standard_normal(kind.shape).astype(np.float32)).to(kind.torch_dtype)
                for name, kind in kinds.items()
                if kind.shape
            }
            nan = float("nan") if i == 0 else None
            w.append(
                step,
                **values,
                losses=torch.tensor(nan or 10.0 - i).bfloat16(),
                learning_rate=nan or 1e-3 * (1 - i / 10),
                grad_norm=nan or 0.5 + i,
                grad_norm_clipped=nan or 0.5,
            )
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return record(tmp_path_factory.mktemp("scripting") / "run.zarr", [0, 2, 4, 6, 8])


def run_cli(*args, env=None, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wordystore.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        **popen,
    )


# -- help: quick, and saying something ------------------------------------------------------------------

LOADED = (
    "import sys; from wordystore.cli import main; code = main(sys.argv[1:]); "
    "print(sorted(m for m in {} if m in sys.modules))"
)
HEAVY = ("torch", "transformers", "wordystore.format.layout", "wordystore.read.trajectory", "matplotlib")


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["--version"]])
def test_help_and_version_import_nothing_heavy(args):
    """`wordystore --help` took 4.6 s because the package imported torch first; now it imports none of it."""
    proc = subprocess.run([sys.executable, "-c", LOADED.format(HEAVY), *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]"


def test_importing_the_package_registers_bfloat16_without_torch():
    code = (
        "import sys, wordystore; from zarr.core.dtype import data_type_registry; "
        "print('bfloat16' in data_type_registry.contents, 'torch' in sys.modules); "
        "wordystore.open; print('torch' in sys.modules, callable(wordystore.verify))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.split() == ["True", "False", "True", "True"], proc.stderr


def test_the_verify_function_keeps_its_name_when_its_module_is_imported_first():
    code = (
        "import wordystore.check.verification, wordystore; "
        "print(wordystore.verify.__name__, type(wordystore.verify).__name__)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.split() == ["verify", "function"], proc.stderr


def test_every_flag_says_what_it_means_and_its_default_and_every_command_has_examples():
    for name, command in build_parser()._subparsers._group_actions[0].choices.items():
        assert command.epilog and command.epilog.startswith("examples:\n  wordystore"), name
        for action in command._actions:
            if action.help in (None, "==SUPPRESS==") and action.dest in ("help", "debug"):
                continue
            assert action.help and "default: None" not in action.help, (name, action.dest)
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    helps = {action.dest: action.help for action in train._actions}
    assert helps["steps"] == "optimizer steps to train (the LR schedule's max_steps) (default: 200)"
    assert helps["vocab_size"].endswith("(default: the tokenizer's vocabulary, 50,257 for GPT-2)")
    assert helps["out"] and helps["overwrite"]


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"wordystore {wordystore.__version__}\n"


# -- --json ------------------------------------------------------------------------------------------------


def test_info_json_says_what_info_does(store, capsys):
    assert main(["info", str(store), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    t = wordystore.open(store)
    assert doc["rows"] == 5 and doc["steps"] == [0, 8] and doc["token_sets"] == {"trained": 5, "untrained": 7}
    assert doc["config"] == t.config and doc["profile"] == "compact"
    on_disk = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    assert doc["bytes_on_disk"] == on_disk
    emb = doc["kinds"]["embeddings"]
    assert emb["shape"] == [5, VOCAB, DIM] and emb["dims"] == ["step", "token", "dim"]
    assert emb["raw_bytes"] == 5 * VOCAB * DIM * 2
    assert emb["bytes_on_disk"] == sum(
        f.stat().st_size for tier in (store, store / "hot") for f in (tier / "embeddings").rglob("*") if f.is_file()
    )


def test_verify_json_lists_the_problems(store, tmp_path, capsys):
    assert main(["verify", str(store), "--json", "--quiet"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["problems"] == [] and doc["verified_rows"] == 5 and doc["verified_steps"] == [0, 8]
    damaged = tmp_path / "d.zarr"
    subprocess.run(["cp", "-r", str(store), str(damaged)], check=True)
    shard = next(p for p in sorted((damaged / "embeddings" / "c").rglob("*")) if p.is_file())
    data = bytearray(shard.read_bytes())
    data[5] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["verify", str(damaged), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert not doc["ok"] and doc["exit_status"] == 1 and doc["verified_rows"] == 0
    assert doc["problems"][0]["where"] == "embeddings" and doc["problems"][0]["rows"] == [0, 4]
    assert "crc32c checksum mismatch" in doc["problems"][0]["what"]


def test_compare_json(store, tmp_path, capsys):
    other = record(tmp_path / "other.zarr", [0, 2, 4, 6, 8, 10])
    assert main(["compare", str(store), str(other), "--out", str(tmp_path / "cmp"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["rows"] for r in doc["runs"]] == [5, 6] and doc["runs"][1]["steps"] == [0, 10]
    assert doc["config_differences"] == []
    lr = doc["learning_rate"]
    assert lr["first_difference"] == {"common_steps": 5, "differing_steps": 0, "step": None, "a": None, "b": None}
    assert lr["A"][0] == [2, pytest.approx(9e-4)]
    assert doc["out"] == str(tmp_path / "cmp") and "compare.md" not in doc["plots"]


# -- --quiet, and progress bars on a terminal only --------------------------------------------------------


def on_a_terminal(*args) -> str:
    """Run the command with its stderr on a pseudo-terminal; what it drew there."""
    main_fd, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # 160 columns wide (0 x 0 if unset)
    proc = subprocess.Popen(
        [sys.executable, "-m", "wordystore.cli", *map(str, args)], stdout=subprocess.DEVNULL, stderr=terminal
    )
    os.close(terminal)
    drawn = b""
    while True:
        try:
            chunk = os.read(main_fd, 4096)
        except OSError:  # the terminal closed
            break
        if not chunk:
            break
        drawn += chunk
    assert proc.wait() == 0, drawn
    os.close(main_fd)
    return drawn.decode(errors="replace")


def test_progress_bars_only_on_a_terminal_and_never_with_quiet(store, tmp_path):
    export_args = ["export", store, tmp_path / "x.safetensors", "--overwrite"]
    assert "export x.safetensors" in on_a_terminal(*export_args)
    assert "export x.safetensors" not in on_a_terminal(*export_args, "--quiet")
    piped = run_cli(*export_args)
    assert piped.returncode == 0 and "export x.safetensors" not in piped.stderr
    drawn = on_a_terminal("import", tmp_path / "x.safetensors", tmp_path / "y.zarr")
    assert "5/5" in drawn and "row/s" in drawn and "B/s" not in drawn  # the import bar counts rows


@pytest.mark.parametrize(
    "command", ["export", "import", "stitch", "convert", "report", "compare", "verify", "train", "export-scalars"]
)
def test_every_command_that_draws_a_bar_takes_quiet(command):
    choices = build_parser()._subparsers._group_actions[0].choices
    assert "--quiet" in choices[command]._option_string_actions


# -- shell completion --------------------------------------------------------------------------------------


def test_completion_scripts_name_every_command(capsys):
    pytest.importorskip("shtab")
    assert main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    assert all(name in script for name in ("export-scalars", "train", "--learning-rate", "--tensorboard"))


def test_completion_without_shtab_says_how_to_get_it(tmp_path):
    code = "import sys; sys.modules['shtab'] = None; from wordystore.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run([sys.executable, "-c", code, "completion", "zsh"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"wordystore completion: error: shell completion: shtab is not installed; {install_hint('completion')}"
    ]


# -- export-scalars ----------------------------------------------------------------------------------------


def read_events(log_dir) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard's own reader of the event files in ``log_dir``: tag -> [(step, value), ...]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_export_scalars_writes_what_tensorboard_reads_back(store, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    assert main(["export-scalars", str(store), "--tensorboard", str(tmp_path / "tb")]) == 0
    assert capsys.readouterr().out.startswith(
        "wrote 16 scalars (losses 4, learning_rate 4, grad_norm 4, grad_norm_clipped 4)"
    )
    events = read_events(tmp_path / "tb")
    t = wordystore.open(store)
    assert sorted(events) == ["grad_norm", "grad_norm_clipped", "learning_rate", "losses"]
    for tag, points in events.items():
        values = t[tag].numpy().astype(np.float32)
        assert [s for s, _ in points] == t.steps[1:].tolist()  # row 0 (NaN: before training) left out
        assert [v for _, v in points] == values[1:].tolist()


def test_export_scalars_without_tensorboard_says_how_to_get_it(store, tmp_path):
    code = (
        "import sys; sys.modules['tensorboard'] = None\nfrom wordystore.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "export-scalars", str(store), "--tensorboard", str(tmp_path / "tb")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and not (tmp_path / "tb").exists()
    assert proc.stderr.splitlines() == [
        f"wordystore export-scalars: error: TensorBoard event files: tensorboard is not "
        f"installed; {install_hint('tensorboard')}"
    ]


# -- the round trip ----------------------------------------------------------------------------------------


def test_export_import_keeps_token_sets_config_and_scalar_kinds(tmp_path):
    source = record(tmp_path / "a.zarr", [0, 1, 2, 3, 4], extra_kinds=("wpe",))
    with pytest.warns(RoundTripWarning, match=r"kinds \['wpe'\] are not in the notebook's layout"):
        export(source, tmp_path / "a.safetensors", progress=False)
    assert set(load_file(str(tmp_path / "a.safetensors"))) == NOTEBOOK_TENSORS  # the notebook's layout, exactly
    back = import_seed_file(tmp_path / "a.safetensors", tmp_path / "b.zarr", progress=False)
    t = wordystore.open(source)
    assert back.token_sets.keys() == t.token_sets.keys()
    assert all(np.array_equal(back.token_sets[k], t.token_sets[k]) for k in t.token_sets)
    assert back.config["run"] == {"note": "a config that travels"} and back.config["seed_scalars"] == pytest.approx(
        SCALARS
    )
    for kind in ("learning_rate", "grad_norm", "grad_norm_clipped", "losses", "embeddings"):
        assert back[kind].numpy().tobytes() == t[kind].numpy().tobytes(), kind  # bit for bit, NaN included
    assert "wpe" not in back.kinds


def test_a_token_subset_travels_with_its_vocabulary_ids(store, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left behind: no warning
        export(store, tmp_path / "s.safetensors", tokens=[1, 6, 7, 11], steps=slice(2, 6), progress=False)
    back = import_seed_file(tmp_path / "s.safetensors", tmp_path / "s.zarr", progress=False)
    assert back.config["token_ids"] == [1, 6, 7, 11]
    assert back.token_sets["trained"].tolist() == [0] and back.token_sets["untrained"].tolist() == [1, 2, 3]
    assert back.learning_rate.numpy().tobytes() == wordystore.open(store).learning_rate.numpy([1, 2, 3]).tobytes()


@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            "wordystore.token_sets",
            '{"trained": [0, 99]}',
            r"token set 'trained' is not a list of token positions in \[0, 12\)",
        ),
        ("wordystore.token_sets", "[1, 2]", "'wordystore.token_sets' is not a JSON object of token sets"),
        ("wordystore.config", "not json", "'wordystore.config' is not a JSON object"),
        ("wordystore.scalars", '{"grad_norm": {"dtype": "float32", "data": "AAAA"}}', "does not hold 5 float32 values"),
        (
            "wordystore.scalars",
            '{"embeddings": {"dtype": "float32", "data": ""}}',
            "is not a 0-d kind of a known dtype",
        ),
        ("wordystore.scalars", '{"x": {"dtype": "object", "data": ""}}', "is not a 0-d kind of a known dtype"),
    ],
)
def test_metadata_read_from_a_file_is_checked(store, tmp_path, key, value, message):
    from safetensors.torch import save_file

    tensors = load_file(str(export(store, tmp_path / "x.safetensors", progress=False)))
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={key: value})
    with pytest.raises(ValueError, match=message):
        import_seed_file(tmp_path / "bad.safetensors", tmp_path / "bad.zarr", progress=False)
    assert not (tmp_path / "bad.zarr").exists()


def test_import_of_a_directory_says_so(store, tmp_path, capsys):
    assert main(["import", str(store), str(tmp_path / "x.zarr")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"wordystore import: error: {store} is a directory; expected a .safetensors file in the notebook's layout "
        "(wordystore import FILE STORE: the file comes first)"
    ]
    assert not (tmp_path / "x.zarr").exists()


def test_bfloat16_reads_go_to_numpy_and_matplotlib_as_float32_exactly(store):
    plt = pytest.importorskip("matplotlib.pyplot")
    t = wordystore.open(store)
    losses = t.losses[:]
    assert losses.dtype == torch.bfloat16 and isinstance(losses, torch.Tensor)
    stored = t.losses.numpy()  # ml_dtypes.bfloat16, row 0 NaN as recorded
    as_numpy = np.asarray(losses)
    assert as_numpy.dtype == np.float32
    assert as_numpy.astype(stored.dtype).tobytes() == stored.tobytes()  # exact: every bfloat16 is a float32
    assert repr(losses).startswith("tensor(")
    assert type(losses * 2) is torch.Tensor  # what is computed from a read is a plain tensor
    saved = io.BytesIO()
    torch.save({"losses": losses}, saved)
    saved.seek(0)
    loaded = torch.load(saved)["losses"]  # weights_only: saved as the plain bfloat16 tensor it is
    assert type(loaded) is torch.Tensor and loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.view(torch.int16), losses.view(torch.int16))
    figure, axes = plt.subplots()
    try:
        (line,) = axes.plot(t.steps, t.losses[:])  # as a researcher writes it
        np.testing.assert_array_equal(line.get_ydata(), stored.astype(np.float32))
        np.testing.assert_array_equal(line.get_xdata(), [0, 2, 4, 6, 8])
    finally:
        plt.close(figure)


def test_float_to_and_numpy_dtype_read_converted_values_lazily(store):
    t = wordystore.open(store)
    view = t.losses.float()
    assert type(view) is type(t.losses) and view.dtype == torch.float32 and "as float32" in repr(view)
    assert view.shape == t.losses.shape and view.numpy_dtype == np.float32
    stored = t.losses.numpy()
    for got in (view[:], torch.stack(list(view))):
        assert got.dtype == torch.float32 and type(got) is torch.Tensor
        np.testing.assert_array_equal(got.numpy(), stored.astype(np.float32))
    np.testing.assert_array_equal(view.loc[2:6].numpy(), stored[1:4].astype(np.float32))  # .loc as on any view
    one_call = t.losses.numpy(dtype="float32")  # a scalar kind as float32, in one call
    assert one_call.dtype == np.float32
    np.testing.assert_array_equal(one_call, stored.astype(np.float32))

    embeddings = t.embeddings.numpy()
    for dtype in (torch.float64, np.float64, "float64"):
        wide = t.embeddings.to(dtype)
        assert wide.dtype == torch.float64
        np.testing.assert_array_equal(wide[-1, "untrained"].numpy(), embeddings[-1, 5:].astype(np.float64))
    narrow = t.learning_rate.to(torch.bfloat16)  # rounding, as numpy's astype (ml_dtypes) does
    assert narrow[:].dtype == torch.bfloat16
    assert narrow.numpy().tobytes() == t.learning_rate.numpy().astype(stored.dtype).tobytes()
    assert t.grad_norm.numpy(dtype=np.float64).dtype == np.float64
    with pytest.raises(ValueError, match=r"cannot read as 'complex64'; expected one of \["):
        t.losses.to("complex64")


def test_import_says_what_it_wrote_in_one_line_as_export_does(store, tmp_path, capsys):
    assert main(["export", str(store), str(tmp_path / "run.safetensors"), "--quiet"]) == 0
    assert main(["import", str(tmp_path / "run.safetensors"), str(tmp_path / "back.zarr"), "--quiet"]) == 0
    exported, imported = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"wrote .*run\.safetensors \([\d.]+ MB\)", exported)
    assert re.fullmatch(r"wrote .*back\.zarr \(5 rows, steps 0\.\.8; [\d.]+ MB\)", imported)
