"""Export to and import from the notebook's safetensors layout, checked with safetensors' own loader."""

import struct

import numpy as np
import pytest
import torch
from notebook_reference import NotebookParameters, run_notebook
from safetensors.torch import load_file, save_file

import wordystore
from trainer.config import RunConfig
from trainer.experiment import load_corpus, load_tokenizer, tokenize_cached
from trainer.run import train
from wordystore.cli import main as cli
from wordystore.tools.safetensors_layout import STEP_KINDS, export, import_seed_file
from wordystore.tools.stitch import stitch

SHAPE = dict(vocab_size=300, hidden_dim=8, batch_size=2, steps=5, max_seq_len=16)
SMALL = dict(**SHAPE, bf16_matmul="native")  # as the notebook


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Our store, and the notebook's own save_file of the same run (cell 15)."""
    tmp = tmp_path_factory.mktemp("seed")
    cfg = RunConfig(**SMALL)
    train(tmp / "run.zarr", cfg, progress=False)
    ids = tokenize_cached(load_corpus(), load_tokenizer()) % SMALL["vocab_size"]
    notebook = NotebookParameters(**SHAPE)
    data = run_notebook(notebook, ids, str(tmp / "nb"))
    present = np.zeros(SMALL["vocab_size"], bool)
    present[ids] = True
    data.update(
        init_scale=torch.tensor(notebook.init_scale, dtype=torch.float32),
        learning_rate=torch.tensor(notebook.learning_rate, dtype=torch.float32),
        weight_decay=torch.tensor(notebook.weight_decay, dtype=torch.float32),
        adam_beta1=torch.tensor(notebook.adam_beta1, dtype=torch.float32),
        adam_beta2=torch.tensor(notebook.adam_beta2, dtype=torch.float32),
        n_trained=torch.tensor(int(present.sum()), dtype=torch.long),
        n_untrained=torch.tensor(int((~present).sum()), dtype=torch.long),
    )
    save_file(data, str(tmp / "notebook.safetensors"))
    return tmp


def assert_same_tensors(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        x, y = a[name], b[name]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if x.dtype == torch.bfloat16:
            x, y = x.view(torch.int16), y.view(torch.int16)
        assert torch.equal(x, y), name


def test_export_equals_what_the_notebook_saves(runs):
    out = export(runs / "run.zarr", runs / "export.safetensors", progress=False)
    assert_same_tensors(load_file(str(out)), load_file(str(runs / "notebook.safetensors")))


def test_import_then_export_reproduces_the_original(runs, tmp_path):
    t = import_seed_file(runs / "notebook.safetensors", tmp_path / "imported.zarr", progress=False)
    assert len(t) == SMALL["steps"] + 1
    export(tmp_path / "imported.zarr", tmp_path / "again.safetensors", progress=False)
    assert_same_tensors(load_file(str(tmp_path / "again.safetensors")), load_file(str(runs / "notebook.safetensors")))


def test_import_predicts_the_moments_by_measure_and_no_predict_stores_them_plainly(runs, tmp_path):
    t = import_seed_file(runs / "notebook.safetensors", tmp_path / "p.zarr", progress=False)
    choice = t.config["import_prediction"]
    assert set(choice["sample_bytes"]) == {"estimated", "unclipped", "plain"}  # the file carries no grad_norm
    assert choice["chosen"] == min(choice["sample_bytes"], key=choice["sample_bytes"].get)
    assert t.kinds["clip_coef"] == wordystore.Kind((), "float32", ()) and choice["clip_coef"] == "estimated"
    coefficients = t.clip_coef.numpy()
    assert coefficients[0] == 1 and np.all((coefficients > 0) & (coefficients <= 1))
    if choice["chosen"] == "estimated":
        assert t.predictions["momentum"].clip == "clip_coef" and (tmp_path / "p.zarr" / "momentum.residuals").is_dir()
    assert (
        cli(["import", str(runs / "notebook.safetensors"), str(tmp_path / "plain.zarr"), "--no-predict", "--quiet"])
        == 0
    )
    plain = wordystore.open(tmp_path / "plain.zarr")
    assert plain.predictions == {} and "clip_coef" not in plain.kinds and "import_prediction" not in plain.config
    export(tmp_path / "plain.zarr", tmp_path / "again.safetensors", progress=False)
    assert_same_tensors(load_file(str(tmp_path / "again.safetensors")), load_file(str(runs / "notebook.safetensors")))


def test_import_attaches_a_mask_file_as_token_sets(runs, tmp_path):
    mask = torch.zeros(SMALL["vocab_size"], dtype=torch.bool)
    mask[::3] = True
    save_file(
        {
            "trained_mask": mask,
            "untrained_mask": ~mask,
            "trained_indices": torch.nonzero(mask)[:, 0],
            "untrained_indices": torch.nonzero(~mask)[:, 0],
        },
        str(tmp_path / "masks.safetensors"),
    )
    t = import_seed_file(
        runs / "notebook.safetensors", tmp_path / "m.zarr", token_masks=tmp_path / "masks.safetensors", progress=False
    )
    np.testing.assert_array_equal(t.token_sets["trained"], np.arange(0, SMALL["vocab_size"], 3))


def test_export_options_select_steps_tokens_and_kinds(runs, tmp_path):
    cli(
        [
            "export",
            str(runs / "run.zarr"),
            str(tmp_path / "part.safetensors"),
            "--rows",
            "1:4",
            "--tokens",
            "untrained",
            "--kinds",
            "embeddings,losses",
        ]
    )
    part = load_file(str(tmp_path / "part.safetensors"))
    full = load_file(str(runs / "notebook.safetensors"))
    untrained = wordystore.open(runs / "run.zarr").token_sets["untrained"]
    assert set(part) == {
        "recorded_steps",
        "embeddings",
        "losses",
        "init_scale",
        "learning_rate",
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "n_trained",
        "n_untrained",
    }
    assert torch.equal(part["recorded_steps"], full["recorded_steps"][1:4])
    assert torch.equal(part["embeddings"].view(torch.int16), full["embeddings"][1:4][:, untrained].view(torch.int16))


def test_bad_inputs_get_clear_errors_and_leave_no_output(runs, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        import_seed_file(junk, tmp_path / "a.zarr", progress=False)
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes((runs / "notebook.safetensors").read_bytes()[:-1000])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        import_seed_file(truncated, tmp_path / "b.zarr", progress=False)
    save_file({"embeddings": torch.zeros(2, 3, 4, dtype=torch.bfloat16)}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="lacks the notebook's tensors"):
        import_seed_file(tmp_path / "partial.safetensors", tmp_path / "c.zarr", progress=False)
    assert not any((tmp_path / n).exists() for n in ("a.zarr", "b.zarr", "c.zarr"))
    (tmp_path / "exists.safetensors").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="exists"):
        export(runs / "run.zarr", tmp_path / "exists.safetensors", progress=False)
    assert (tmp_path / "exists.safetensors").read_bytes() == b"keep me"
    assert cli(["export", str(runs / "run.zarr"), str(tmp_path / "exists.safetensors")]) == 2
    header = struct.unpack(
        "<Q", export(runs / "run.zarr", tmp_path / "x.safetensors", progress=False).read_bytes()[:8]
    )[0]
    assert header % 8 == 0
    assert not list(tmp_path.glob(".*.partial"))


def test_a_file_of_no_tokens_is_refused_on_import_in_one_line(runs, tmp_path, capsys):
    """A notebook-layout file whose token axis is empty (as an export of an empty token set makes) holds
    nothing a store could hold: one line, and nothing created."""
    full = load_file(str(export(runs / "run.zarr", tmp_path / "full.safetensors", progress=False)))
    empty = tmp_path / "empty.safetensors"
    save_file({name: t[:, :0] if name in STEP_KINDS and t.dim() > 1 else t for name, t in full.items()}, str(empty))
    assert cli(["import", str(empty), str(tmp_path / "empty.zarr")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"wordystore import: error: {empty}: kind ") and "a kind's axes are at least 1 long" in line
    assert not (tmp_path / "empty.zarr").exists()


def test_stitch_joins_runs_and_shows_the_seams(runs, tmp_path):
    full = wordystore.open(runs / "run.zarr")
    # two "runs": steps 0-3, and a resumed run that records step 3 again and goes on to 5
    cli(["export", str(runs / "run.zarr"), str(tmp_path / "a.safetensors"), "--steps", "0:3"])
    cli(["export", str(runs / "run.zarr"), str(tmp_path / "b.safetensors"), "--rows", "3:6"])
    import_seed_file(tmp_path / "a.safetensors", tmp_path / "a.zarr", progress=False)
    import_seed_file(tmp_path / "b.safetensors", tmp_path / "b.zarr", progress=False)
    assert cli(["stitch", str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr"), str(tmp_path / "ab.zarr")]) == 0
    t = wordystore.open(tmp_path / "ab.zarr")
    np.testing.assert_array_equal(t.steps, full.steps)
    assert torch.equal(t.embeddings[:].view(torch.int16), full.embeddings[:].view(torch.int16))
    assert [s["steps"] for s in t.segments] == [[0, 3], [4, 5]]
    assert [s["rows"] for s in t.segments] == [[0, 4], [4, 6]]
    assert t.segments[1]["dropped_repeated_steps"] == 1
    other = wordystore.create(tmp_path / "o.zarr", {"x": wordystore.Kind((2,), "float32")})
    other.close()
    with pytest.raises(ValueError, match="kinds differ"):
        stitch([tmp_path / "a.zarr", tmp_path / "o.zarr"], tmp_path / "bad.zarr", progress=False)
