"""Predictions against torch's own optimizer and the numpy reference, the archive profile, and the
checks on predictions.

The references are torch's: ``clip_grad_norm_`` and ``AdamW`` (``foreach=False``, the Trainer's
CPU path, and ``foreach=True``) on a bfloat16 or float32 parameter, whose recorded rows the
replays must predict and rebuild bit for bit; and ``tests/prediction_reference.py``, the format's
replays in numpy, which the library's torch replays must equal bit for bit on any values.
"""

import json

import numpy as np
import prediction_reference as reference
import pytest
import torch
import zarr

import wordystore
from wordystore import AdamPrediction, AdamStepPrediction, Kind
from wordystore.errors import FormatError
from wordystore.format.bfloat16 import NUMPY_BFLOAT16 as BFLOAT16
from wordystore.format.prediction import GRAIN, estimate_clip
from wordystore.tools.convert import convert
from wordystore.tools.stitch import stitch

torch.set_default_device("cpu")  # compared against torch's CPU kernels
VOCAB, DIM, ROWS = 96, 8, 23
NUMPY = {torch.bfloat16: BFLOAT16, torch.float32: np.dtype(np.float32)}


def adamw_run(
    weight_decay: float,
    rows: int = ROWS,
    max_norm: float = 0.5,
    seed: int = 0,
    shape: tuple[int, ...] = (VOCAB, DIM),
    dtype: torch.dtype = torch.bfloat16,
    foreach: bool = False,
) -> dict[str, np.ndarray]:
    """A parameter trained by torch's AdamW with clipping and a decaying learning rate: its rows
    (row 0 the initial state), pre-clip gradients, moments, the learning rate, clip coefficient
    and gradient norm of each step, as torch computed them."""
    gen = torch.Generator().manual_seed(seed)
    param = torch.nn.Parameter((torch.randn(*shape, generator=gen) * 0.02).to(dtype))
    opt = torch.optim.AdamW([param], lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay, foreach=foreach)
    rec = {k: [] for k in ("embeddings", "grads", "momentum", "variance", "learning_rate", "clip", "grad_norm")}

    def keep(p, g, m, v, lr, c, n):
        for k, x in zip(rec, (p, g, m, v)):
            rec[k].append(x.detach().float().numpy().astype(NUMPY[dtype]))  # exact: to float32 and back
        rec["learning_rate"].append(np.float32(lr))
        rec["clip"].append(np.float32(c))
        rec["grad_norm"].append(np.float32(n))

    zeros = torch.zeros_like(param)
    keep(param, zeros, zeros, zeros, np.nan, 1.0, 0.0)
    for step in range(1, rows):
        lr = 1e-2 * (1 - step / (2 * rows))
        for group in opt.param_groups:
            group["lr"] = lr
        param.grad = (torch.randn(*shape, generator=gen) * 0.01 * (1 + step % 3)).to(dtype)
        grad = param.grad.clone()
        norm = torch.nn.utils.clip_grad_norm_([param], max_norm)
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # what clip_grad_norm_ multiplied by
        opt.step()
        state = opt.state[param]
        keep(param, grad, state["exp_avg"], state["exp_avg_sq"], lr, float(coef), float(norm))
    return {k: np.stack(v) for k, v in rec.items()}


def bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(f"u{a.dtype.itemsize}")


def test_estimate_clip_finds_the_coefficient_torch_clipped_by():
    run = adamw_run(0.0)
    assert (run["clip"][1:] < 1).any() and (run["clip"][1:] == 1).any()  # clipped steps and unclipped ones
    for r in range(1, ROWS):
        got = estimate_clip(run["momentum"][r - 1], run["momentum"][r], run["grads"][r], 0.9)
        assert np.float32(got) == run["clip"][r], r


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_the_adamw_step_replay_predicts_torch_and_rebuilds_bit_for_bit(weight_decay):
    run = adamw_run(weight_decay)
    step = AdamStepPrediction("momentum", "variance", "learning_rate", "recorded_steps", 0.9, 0.999, 1e-8, weight_decay)
    inputs = [run["momentum"], run["variance"], run["learning_rate"], np.arange(ROWS)]
    residuals = step.residuals(run["embeddings"], inputs)
    assert np.array_equal(residuals[0], bits(run["embeddings"][0]).view(np.int16))  # the chunk's first row: itself
    assert np.count_nonzero(residuals[1:]) <= residuals[1:].size // 1000  # torch's step, replayed
    assert np.array_equal(step.rebuild(residuals, inputs), bits(run["embeddings"]))
    # stored rows-last (a transposed chunk), the same
    moved = [np.moveaxis(a, 0, -1) if a.ndim > 1 else a for a in inputs]
    rebuilt = step.rebuild(np.moveaxis(residuals, 0, -1), moved, axis=2)
    assert np.array_equal(rebuilt, np.moveaxis(bits(run["embeddings"]), 0, -1))


def test_moments_with_clip_coefficients_predict_torch_exactly():
    run = adamw_run(0.0)
    for name, moment, beta in (("momentum", "exp_avg", 0.9), ("variance", "exp_avg_sq", 0.999)):
        p = AdamPrediction(moment, "grads", None, beta, clip="clip")
        residuals = p.residuals(run[name], [run["grads"], run["clip"]])
        assert np.count_nonzero(residuals[1:]) <= residuals[1:].size // 1000, name
        assert np.array_equal(p.rebuild(residuals, [run["grads"], run["clip"]]), bits(run[name]))


EDGES = {  # values no optimizer should give, which the replays must still compute as the format says
    2: [0x7FC0, 0xFFC1, 0x7F80, 0xFF80, 0x0001, 0x807F, 0x0080, 0x8000, 0x0000, 0x7F7F, 0xFF7F, 0x3F80],
    4: [
        0x7FC00000,
        0xFFC00001,
        0x7F800000,
        0xFF800000,
        0x00000001,
        0x807FFFFF,
        0x00800000,
        0x80000000,
        0,
        0x7F7FFFFF,
        0xFF7FFFFF,
        0x3F800000,
    ],
}  # NaNs (one with a payload), infinities, the smallest and largest subnormals, zeros, the largest finite, 1


def with_edges(a: np.ndarray, seed: int) -> np.ndarray:
    """``a`` with about 1% of its values replaced by :data:`EDGES` (bits), at random places."""
    size = a.dtype.itemsize
    out = np.array(a)
    flat = out.reshape(-1).view(f"u{size}")
    rng = np.random.default_rng(seed)
    where = rng.choice(flat.size, flat.size // 100, replace=False)
    flat[where] = rng.choice(np.array(EDGES[size], f"u{size}"), len(where))
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_torch_replays_equal_the_numpy_reference_bit_for_bit(dtype):
    """Real-looking rows (torch's AdamW) wide enough for several blocks of columns, with edge
    values mixed in, and clip coefficients of every kind (0, 1, NaN, from norms of 0, inf, NaN)."""
    rows, shape = 7, (90, 400)  # 36,000 values a row: more than GRAIN, so blocks of columns in every replay
    assert shape[0] * shape[1] > GRAIN
    run = adamw_run(0.1, rows=rows, shape=shape, dtype=dtype, max_norm=1.0)
    clean = {k: run[k] for k in ("embeddings", "grads", "momentum", "variance")}
    edged = {k: with_edges(v, seed) for seed, (k, v) in enumerate(clean.items())}
    clip = np.array([1, 0.25, 0, np.nan, 1, 0.5, np.inf], np.float32)
    norms = np.array([0, 3.0, np.inf, np.nan, 0.5, 1e-30, 2.0], np.float32)
    if dtype == torch.bfloat16:
        clip, norms = (np.asarray(reference.bf16(a)) for a in (clip, norms))
    for arrays in (clean, edged):
        for moment, name, beta in (
            ("exp_avg", "momentum", 0.9),
            ("exp_avg_sq", "variance", 0.999),
            ("exp_avg", "momentum", 0.3),
        ):
            for p, extra in (
                (AdamPrediction(moment, "grads", None, beta, clip="clip"), [clip]),
                (AdamPrediction(moment, "grads", "grad_norm", beta, 1.0), [norms]),
                (AdamPrediction(moment, "grads", None, beta), []),
            ):
                inputs = [arrays["grads"], *extra]
                want = reference.adam_residuals(p, arrays[name], inputs)
                got = p.residuals(arrays[name], inputs)
                assert got.dtype == want.dtype and np.array_equal(got, want), (p, dtype)
                assert np.array_equal(p.rebuild(got, inputs), bits(arrays[name])), (p, dtype)
        for decay in (0.0, 0.1):
            step = AdamStepPrediction(
                "momentum", "variance", "learning_rate", "recorded_steps", 0.9, 0.999, 1e-8, decay
            )
            inputs = [arrays["momentum"], arrays["variance"], run["learning_rate"], np.arange(rows)]
            want = reference.step_residuals(step, arrays["embeddings"], inputs)
            got = step.residuals(arrays["embeddings"], inputs)
            assert got.dtype == want.dtype and np.array_equal(got, want), (step, dtype)
            assert np.array_equal(step.rebuild(got, inputs), reference.step_rebuild(step, want, inputs))
            assert np.array_equal(step.rebuild(got, inputs), bits(arrays["embeddings"]))


@pytest.mark.parametrize("foreach", [False, True])
def test_float32_replays_predict_torch_adamw_exactly(foreach):
    """A float32 parameter: torch's AdamW moments (both forms, clip_grad_norm_ by the recorded norms)
    are predicted exactly, every value of every row after a chunk's first; its step almost."""
    run = adamw_run(0.1, dtype=torch.float32, foreach=foreach, max_norm=0.05)
    assert (run["clip"][1:] < 1).all()  # every step clipped: the clip coefficient's rule is exercised
    for name, moment, beta in (("momentum", "exp_avg", 0.9), ("variance", "exp_avg_sq", 0.999)):
        p = AdamPrediction(moment, "grads", "grad_norm", beta, 0.05)
        inputs = [run["grads"], run["grad_norm"]]
        residuals = p.residuals(run[name], inputs)
        assert residuals.dtype == np.int32 and np.count_nonzero(residuals[1:]) == 0, name
        assert np.array_equal(p.rebuild(residuals, inputs), bits(run[name]))
    step = AdamStepPrediction("momentum", "variance", "learning_rate", "recorded_steps", 0.9, 0.999, 1e-8, 0.1)
    inputs = [run["momentum"], run["variance"], run["learning_rate"], np.arange(ROWS)]
    residuals = step.residuals(run["embeddings"], inputs)
    # torch's float32 sqrt is not correctly rounded, the format's is: a few values differ
    assert np.count_nonzero(residuals[1:]) <= residuals[1:].size // 100
    assert np.array_equal(step.rebuild(residuals, inputs), bits(run["embeddings"]))


def kinds() -> dict[str, Kind]:
    return wordystore.seed_kinds(VOCAB, DIM)


def write_run(path, run, profile, predictions, rows=None, **args):
    with wordystore.create(path, kinds(), profile=profile, predictions=predictions, **args) as w:
        for r in range(len(run["embeddings"])) if rows is None else rows:
            w.append(
                r,
                embeddings=run["embeddings"][r],
                grads=run["grads"][r],
                momentum=run["momentum"][r],
                variance=run["variance"][r],
                logits=np.zeros(VOCAB, np.float32).astype(run["grads"].dtype),
                losses=0.0,
                learning_rate=run["learning_rate"][r],
                grad_norm=0.0,
                grad_norm_clipped=0.0,
            )
    return wordystore.open(path)


def test_the_archive_profile_writes_compacts_and_converts_bit_for_bit(tmp_path):
    run = adamw_run(0.0)
    moments = wordystore.adam_predictions(0.9, 0.999, None)
    archive = wordystore.archive_predictions(moments, 1e-8)
    # the writer: hot blocks, compactions, a partial last chunk
    t = write_run(tmp_path / "a.zarr", run, "archive", archive, block_rows=2, chunk_rows=8)
    assert t.profile == "archive" and isinstance(t.predictions["embeddings"], AdamStepPrediction)
    for name in ("embeddings", "grads", "momentum", "variance"):
        assert np.array_equal(bits(t[name].numpy()), bits(run[name])), name
    assert np.array_equal(
        bits(t.embeddings.numpy((slice(9, 20), [3, 50]), orthogonal=True)), bits(run["embeddings"][9:20, [3, 50]])
    )
    # what a plain reader sees: the residuals under their own name, rows first, one pcodec page a row
    group = zarr.open_group(tmp_path / "a.zarr", mode="r")
    assert "embeddings" not in group
    residuals = group["embeddings.residuals"]
    assert residuals.attrs["wordystore"] == {
        "residuals_of": "embeddings",
        "prediction": t.predictions["embeddings"].to_json(),
    }
    assert np.array_equal(residuals[0], bits(run["embeddings"][0]).view(np.int16))
    assert np.count_nonzero(residuals[1:8]) <= residuals[1:8].size // 1000
    # convert: to compact and back to archive, bit for bit, smaller than compact
    compact = convert(tmp_path / "a.zarr", tmp_path / "c.zarr", progress=False)
    assert set(compact.predictions) == {"momentum", "variance"} and compact.profile == "compact"
    again = convert(tmp_path / "c.zarr", tmp_path / "b.zarr", profile="archive", progress=False)
    for name in kinds():
        assert bits(again[name].numpy()).tobytes() == bits(compact[name].numpy()).tobytes(), name
    size = {p: sum(f.stat().st_size for f in (tmp_path / p).rglob("*") if f.is_file()) for p in ("b.zarr", "c.zarr")}
    assert size["b.zarr"] < size["c.zarr"]
    # stitch: a run and its continuation, both archived, joined in the archive profile
    write_run(tmp_path / "first.zarr", run, "archive", archive, rows=range(15), chunk_rows=8, block_rows=4)
    write_run(tmp_path / "then.zarr", run, "archive", archive, rows=range(10, ROWS), chunk_rows=8, block_rows=4)
    joined = stitch([tmp_path / "first.zarr", tmp_path / "then.zarr"], tmp_path / "j.zarr", progress=False)
    assert joined.profile == "archive"
    assert np.array_equal(bits(joined.embeddings.numpy()), bits(run["embeddings"]))


@pytest.mark.parametrize("profile", ["compact", "archive"])
def test_float32_kinds_are_stored_as_int32_residuals_bit_for_bit(tmp_path, profile):
    run = adamw_run(0.1, dtype=torch.float32, max_norm=0.05)
    tensor = Kind((VOCAB, DIM), "float32", ("token", "dim"))
    kinds = {name: tensor for name in ("embeddings", "grads", "momentum", "variance")}
    kinds |= {"learning_rate": Kind((), "float32"), "grad_norm": Kind((), "float32")}
    predictions = wordystore.adam_predictions(0.9, 0.999, 0.05)
    if profile == "archive":
        predictions = wordystore.archive_predictions(predictions, 1e-8, 0.1)
    with wordystore.create(tmp_path / "f.zarr", kinds, profile=profile, predictions=predictions, chunk_rows=8) as w:
        for r in range(ROWS):
            w.append(r, **{name: run[name][r] for name in kinds})
    t = wordystore.open(tmp_path / "f.zarr")
    for name in kinds:
        assert np.array_equal(bits(t[name].numpy()), bits(run[name])), name
    residuals = zarr.open_group(tmp_path / "f.zarr", mode="r")["momentum.residuals"]
    assert residuals.dtype == np.int32 and np.count_nonzero(residuals[1:8]) == 0


def test_predictions_are_checked(tmp_path):
    moments = wordystore.adam_predictions(0.9, 0.999, 1.0)
    archive = wordystore.archive_predictions(moments, 1e-8)
    with pytest.raises(ValueError, match="only the archive profile"):
        wordystore.create(tmp_path / "a.zarr", kinds(), predictions=archive)
    with pytest.raises(ValueError, match="archive profile predicts a parameter"):
        wordystore.create(tmp_path / "b.zarr", kinds(), profile="archive", predictions=moments)
    cycle = {
        "momentum": AdamPrediction("exp_avg", "variance", None, 0.9),
        "variance": AdamPrediction("exp_avg_sq", "momentum", None, 0.999),
    }
    with pytest.raises(ValueError, match="cycle: momentum -> variance -> momentum"):
        wordystore.create(tmp_path / "c.zarr", kinds(), predictions=cycle)
    with pytest.raises(ValueError, match="clip coefficients or from gradient norms, not both"):
        AdamPrediction("exp_avg", "grads", "grad_norm", 0.9, clip="clip_coef")
    with pytest.raises(ValueError, match="lacks .*learning_rate"):
        no_lr = {k: v for k, v in kinds().items() if k != "learning_rate"}
        with wordystore.create(tmp_path / "d.zarr", no_lr, predictions=moments) as w:
            w.append(0, **{k: np.zeros(v.shape, v.numpy_dtype) for k, v in no_lr.items()})
        convert(tmp_path / "d.zarr", tmp_path / "e.zarr", profile="archive", progress=False)
    assert not (tmp_path / "e.zarr").exists()
    # a store whose metadata names a cycle is refused on open, not read forever
    write_run(tmp_path / "f.zarr", adamw_run(0.0, rows=3), "compact", moments)
    root = tmp_path / "f.zarr" / "zarr.json"
    doc = json.loads(root.read_text())
    doc["attributes"]["wordystore"]["predictions"]["momentum"]["grads"] = "variance"
    doc["attributes"]["wordystore"]["predictions"]["variance"]["grads"] = "momentum"
    root.write_text(json.dumps(doc))
    with pytest.raises(FormatError, match="cycle"):
        wordystore.open(tmp_path / "f.zarr")
