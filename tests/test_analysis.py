"""Analyses, reports and displays, checked on real stores against direct numpy computations.

The stores are built on the bfloat16 lattice: each coordinate's order-preserving index moves by a
known number of values each row, and each token stops changing from a known row on, so lattice hops
and freeze steps have an exact ground truth that does not go through the code under test.
"""

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

import wordystore
from trainer.config import RunConfig
from wordystore import Kind
from wordystore.analysis import measures, report
from wordystore.cli import main
from wordystore.optional import install_hint
from wordystore.read import display, reading
from wordystore.tools.stitch import stitch

BF16 = np.dtype(ml_dtypes.bfloat16)
MATRIX = ("embeddings", "grads", "momentum", "variance")


def bf16_from_lattice(index: np.ndarray) -> np.ndarray:
    """bfloat16 values at lattice positions: sign-magnitude bit patterns (0 is +0)."""
    return np.where(index < 0, 0x8000 | -index, index).astype(np.uint16).view(BF16)


def build(path, *, rows=20, vocab=40, dim=6, seed=0, kick_row=None, first_step=0, lr=None, config=None):
    """A store whose embeddings walk the lattice: token i changes at rows 1..freeze_row[i] (0: never;
    rows-1: still moving), by 1..5 values per coordinate per row (x40 at ``kick_row``)."""
    rng = np.random.default_rng(seed)
    freeze_row = rng.integers(0, rows, vocab)
    freeze_row[:3] = [0, rows - 1, rows // 2]
    delta = rng.integers(1, 6, (rows, vocab, dim)) * rng.choice([-1, 1], (rows, vocab, dim))
    delta[:, :, 0] *= rng.integers(0, 2, (rows, vocab))  # some coordinates stay put while others move
    delta[0] = 0
    delta[np.arange(rows)[:, None] > freeze_row[None, :]] = 0
    if kick_row is not None:
        delta[kick_row] *= 40
    index = rng.integers(-16000, 16000, (vocab, dim)) + np.cumsum(delta, axis=0)
    ref = {
        "embeddings": bf16_from_lattice(index),
        "grads": rng.standard_normal((rows, vocab, dim)).astype(BF16),
        "momentum": (rng.standard_normal((rows, vocab, dim)) * 1e-3).astype(BF16),
        "variance": (rng.random((rows, vocab, dim)) * 1e-22).astype(BF16),  # squares underflow float32
    }
    steps = first_step + 2 * np.arange(rows)
    lr = np.full(rows, 1e-3, np.float32) if lr is None else lr
    kinds = {name: Kind((vocab, dim), "bfloat16", ("token", "dim")) for name in MATRIX}
    kinds.update(
        losses=Kind((), "bfloat16", ()),
        learning_rate=Kind((), "float32", ()),
        grad_norm=Kind((), "float32", ()),
        grad_norm_clipped=Kind((), "float32", ()),
    )
    sets = {"even": np.arange(0, vocab, 2), "odd": np.arange(1, vocab, 2)}
    losses = np.linspace(10, 7, rows).astype(BF16)
    with wordystore.create(
        path, kinds, token_sets=sets, config=config or {"seed": seed}, block_rows=4, chunk_rows=8
    ) as w:
        for r in range(rows):
            w.append(
                int(steps[r]),
                **{name: ref[name][r] for name in MATRIX},
                losses=losses[r : r + 1].reshape(()),
                learning_rate=lr[r],
                grad_norm=np.float32(r),
                grad_norm_clipped=np.float32(min(r, 1)),
            )
    return {**ref, "steps": steps, "delta": np.abs(delta), "freeze_row": freeze_row, "losses": losses, "lr": lr}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("analysis") / "walk.zarr"
    return path, build(path)


def lower_median(x):
    return np.sort(x, axis=1)[:, (x.shape[1] - 1) // 2]


@pytest.mark.parametrize("tokens", ["odd", None, [5, 3, 3, 17, 2, 0]])
@pytest.mark.parametrize("max_bytes", [3000, measures.MAX_BYTES])  # many row blocks and token tiles, or one
def test_embedding_stats_match_numpy(store, tokens, max_bytes):
    path, ref = store
    t = wordystore.open(path)
    ids = t.token_set(tokens) if isinstance(tokens, str) else np.arange(40) if tokens is None else np.array(tokens)
    s = measures.embedding_stats(t, tokens, max_bytes=max_bytes)
    tab = s.table
    w = ref["embeddings"][:, ids].astype(np.float32)
    bits = ref["embeddings"][:, ids].view(np.uint16)
    np.testing.assert_array_equal(tab["step"], ref["steps"])
    np.testing.assert_array_equal(s.token_ids, ids)

    disp = np.linalg.norm(w - w[0], axis=-1)
    move = np.linalg.norm(w[1:] - w[:-1], axis=-1)
    for name, values, rows in (("displacement", disp, slice(None)), ("movement", move, slice(1, None))):
        np.testing.assert_allclose(tab[f"{name}_max"][rows], values.max(axis=1), rtol=1e-6)
        np.testing.assert_allclose(tab[f"{name}_mean"][rows], values.astype(np.float64).mean(axis=1), rtol=1e-6)
        np.testing.assert_allclose(tab[f"{name}_median"][rows], lower_median(values), rtol=1e-6)

    centroid = w.mean(axis=1)
    radii = np.linalg.norm(w - centroid[:, None], axis=-1)
    np.testing.assert_allclose(tab["centroid_norm"], np.linalg.norm(centroid, axis=1), rtol=1e-4)
    np.testing.assert_allclose(tab["radius_mean"], radii.mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(tab["radius_max"], radii.max(axis=1), rtol=1e-5)

    unchanged = np.all(bits[1:] == bits[:-1], axis=-1)
    np.testing.assert_array_equal(tab["frozen_fraction"][1:], unchanged.mean(axis=1))
    expected_freeze = np.where(ref["freeze_row"][ids] == 19, -1, ref["steps"][ref["freeze_row"][ids]])
    np.testing.assert_array_equal(s.freeze_step, expected_freeze)

    hops = ref["delta"][1:, ids].reshape(19, -1)  # ground truth from the construction
    np.testing.assert_array_equal(tab["hops_max"][1:], hops.max(axis=1))
    np.testing.assert_allclose(tab["hops_mean"][1:], hops.mean(axis=1), rtol=1e-12)
    np.testing.assert_allclose(tab["moved_fraction"][1:], (hops > 0).mean(axis=1), rtol=1e-12)
    expected_hist = np.zeros((20, 17), np.int64)
    for r in range(1, 20):
        for h in hops[r - 1]:
            expected_hist[r, int(h).bit_length()] += 1
    np.testing.assert_array_equal(s.hop_histogram, expected_hist)
    for name in ("movement_max", "frozen_fraction", "hops_mean", "moved_fraction"):
        assert np.isnan(tab[name][0])


def test_notebook_verification_numbers(store):
    """The notebook's verification cell, in torch, on the store's first and last rows."""
    path, _ = store
    t = wordystore.open(path)
    s = measures.embedding_stats(t, "even")
    w0, w_last = t.embeddings[0, "even"].float(), t.embeddings[-1, "even"].float()
    d = torch.norm(w_last - w0, dim=1)
    assert s.table["displacement_max"][-1] == pytest.approx(d.max().item(), rel=1e-6)
    assert s.table["displacement_mean"][-1] == pytest.approx(d.mean().item(), rel=1e-6)
    assert s.table["displacement_median"][-1] == pytest.approx(d.median().item(), rel=1e-6)  # torch: lower median
    centroid = w0.mean(dim=0)
    radii = torch.norm(w0 - centroid, dim=1)
    assert s.table["centroid_norm"][0] == pytest.approx(torch.norm(centroid).item(), rel=1e-4)
    assert s.table["radius_mean"][0] == pytest.approx(radii.mean().item(), rel=1e-5)
    assert s.table["radius_max"][0] == pytest.approx(radii.max().item(), rel=1e-5)


def test_freeze_step_counts_and_hop_bins(store):
    path, ref = store
    s = measures.embedding_stats(wordystore.open(path), None)
    counts = s.freeze_step_counts()
    rows = ref["freeze_row"][ref["freeze_row"] < 19]
    np.testing.assert_array_equal(counts["tokens"], np.bincount(rows, minlength=20))
    assert s.still_moving == np.count_nonzero(ref["freeze_row"] == 19)
    assert s.hop_bin_labels()[:5] == ["0", "1", "2-3", "4-7", "8-15"] and len(s.hop_bin_labels()) == 17


def test_lattice_index_counts_every_bfloat16_value_once():
    values = np.arange(2**16, dtype=np.uint16).view(BF16)
    values = values[~np.isnan(values.astype(np.float32))]
    order = np.argsort(values.astype(np.float32), kind="stable")
    index = measures.lattice_index(values[order])
    steps = np.diff(index)
    zero = values[order].astype(np.float32) == 0
    assert np.all(index[zero] == 0) and zero.sum() == 2  # -0 and +0: one value
    assert np.all(steps[~(zero[:-1] & zero[1:])] == 1)  # every other neighbour one hop apart
    assert -index[0] == index[-1] == 0x7F80  # -inf and +inf


def test_moment_norms_are_float64_and_match_numpy(store):
    path, ref = store
    t = wordystore.open(path)
    norms = measures.moment_norms(t, "odd", max_bytes=2000)
    ids = t.token_set("odd")
    for kind in ("grads", "momentum", "variance"):
        x = ref[kind][:, ids].astype(np.float64).reshape(20, -1)
        np.testing.assert_allclose(norms[kind], np.sqrt((x * x).sum(axis=1)), rtol=1e-12)
    assert norms["variance"].min() > 0  # squared in float32 these underflow to 0


def test_curves(store):
    path, ref = store
    c = measures.curves(wordystore.open(path))
    np.testing.assert_array_equal(c["losses"], ref["losses"].astype(np.float64))
    np.testing.assert_array_equal(c["learning_rate"], ref["lr"].astype(np.float64))
    np.testing.assert_array_equal(c["grad_norm"], np.arange(20))
    assert list(c) == ["step", "losses", "learning_rate", "grad_norm", "grad_norm_clipped"]


def test_bad_token_selections_are_named(store):
    t = wordystore.open(store[0])
    with pytest.raises(ValueError, match="token id 40 is out of range: kind 'embeddings' has 40 tokens"):
        measures.embedding_stats(t, [1, 40])
    with pytest.raises(KeyError, match="no token set 'nope'"):
        measures.embedding_stats(t, "nope")
    with pytest.raises(ValueError, match="needs 'token' as its first axis"):
        measures.embedding_stats(t, None, kind="losses")
    with pytest.raises(ValueError, match="no kind 'nope'"):
        measures.moment_norms(t, None, kinds=["nope"])


def test_largest_jump_finds_a_kick(tmp_path):
    ref = build(tmp_path / "kick.zarr", kick_row=12)
    s = measures.embedding_stats(wordystore.open(tmp_path / "kick.zarr"), None)
    step, ratio = measures.largest_jump(s.table["movement_mean"], s.table["step"])
    assert step == ref["steps"][12] and ratio > 10
    assert measures.largest_jump(np.linspace(1, 0.5, 20), ref["steps"]) is None


def test_cache_is_reused_and_invalidated_when_the_store_grows(tmp_path):
    path = tmp_path / "c.zarr"
    build(path, rows=10)
    t = wordystore.open(path)
    first = measures.embedding_stats(t, "odd", cache=True)
    keys = sorted((path / measures.CACHE_PREFIX).iterdir())
    assert len(keys) == 1 and keys[0].name.startswith("embedding_stats-")
    document = json.loads(keys[0].read_text())
    assert document["rows"] == 10
    document["result"]["table"]["displacement_max"]["ndarray"][3] = 123.0  # a marker only the cache holds
    keys[0].write_text(json.dumps(document))
    again = measures.embedding_stats(wordystore.open(path), "odd", cache=True)
    assert again.table["displacement_max"][3] == 123.0
    np.testing.assert_array_equal(again.hop_histogram, first.hop_histogram)
    np.testing.assert_array_equal(again.table["movement_max"], first.table["movement_max"])  # NaN survives

    with wordystore.resume(path) as w:  # the store grows: the cached result is stale
        extra = {name: wordystore.open(path)[name].numpy(-1) for name in t.kinds}
        w.append(100, **extra)
    grown = measures.embedding_stats(wordystore.open(path), "odd", cache=True)
    assert len(grown.table["step"]) == 11 and grown.table["displacement_max"][3] == first.table["displacement_max"][3]


def test_memory_stays_bounded_on_a_store_larger_than_the_working_set(tmp_path):
    rows, vocab, dim = 120, 8192, 32
    rng = np.random.default_rng(1)
    kinds = {"embeddings": Kind((vocab, dim), "bfloat16", ("token", "dim"))}
    row = (rng.standard_normal((vocab, dim), np.float32) * 0.02).astype(BF16)
    with wordystore.create(tmp_path / "big.zarr", kinds) as w:
        for r in range(rows):
            row = row.copy()
            row[: vocab // 2 - 16 * r] = (row[: vocab // 2 - 16 * r].astype(np.float32) * 1.01).astype(BF16)
            w.append(r, embeddings=row)
    del row
    raw = rows * vocab * dim * 2  # 63 MB, 30 times the budget
    t = wordystore.open(tmp_path / "big.zarr", cache_bytes=0)  # the calibration read below keeps nothing
    measures.embedding_stats(t, [0])  # imports done before measuring
    tracemalloc.start()
    try:
        # calibration: tracemalloc sees a read (one under 8 MB: larger outputs are mmap'd huge pages)
        part = t.embeddings.numpy(slice(0, (4 << 20) // (vocab * dim * 2)))
        seen = tracemalloc.get_traced_memory()[1] >= part.nbytes
        del part
        tracemalloc.reset_peak()
        s = measures.embedding_stats(t, None, max_bytes=2**21)
        stats_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        measures.moment_norms(t, None, kinds=["embeddings"], max_bytes=2**21)
        norms_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen
    # the budget, a few float32 rows of the selection (docs/analysis.md), and the reader's fixed decode
    # buffers: up to three chunks per thread (one decoding, two kept for reuse), whatever the store's size
    chunk = t.layouts["embeddings"][0].chunk
    bound = 2**21 + 4 * vocab * dim * 4 + 3 * reading.THREADS * int(np.prod(chunk)) * 2
    assert stats_peak < bound and norms_peak < bound and 4 * bound < raw, (stats_peak, norms_peak, raw)
    assert s.table["frozen_fraction"][-1] == pytest.approx((vocab // 2 + 16 * (rows - 1)) / vocab)


# -- commands and displays ---------------------------------------------------------------------------------


def trainer_config(output_dir, **changes):
    run = RunConfig(steps=20, **changes).to_dict()
    return {
        "run": run,
        "training_arguments": {"lr_scheduler_type": "linear", "max_grad_norm": 1.0, "output_dir": output_dir},
        "device": "cpu",
    }


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    build(root / "a.zarr", config=trainer_config("a.trainer"))
    halved = np.r_[np.full(10, 1e-3), np.full(10, 5e-4)].astype(np.float32)
    build(
        root / "b.zarr",
        config={**trainer_config("b.trainer", learning_rate=2e-3), "note": "<script>"},
        lr=halved,
        kick_row=13,
    )
    return root


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_report_writes_plots_and_key_numbers(two_runs, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", str(two_runs / "b.zarr"), "--out", str(out), "--quiet"]) == 0
    names = {p.name for p in out.iterdir()}
    plots = {
        "losses.png",
        "learning_rate.png",
        "grad_norm.png",
        "displacement.png",
        "movement.png",
        "frozen_fraction.png",
        "lattice_hops.png",
        "freeze_steps.png",
        "moment_norms.png",
    }
    assert names == plots | {"report.md"}
    assert all(is_png(out / name) for name in plots)
    text = (out / "report.md").read_text()
    s = measures.embedding_stats(wordystore.open(two_runs / "b.zarr"), "odd")
    tab = s.table
    assert (
        f"| odd | 20 | {tab['displacement_max'][-1]:.2e} / {tab['displacement_mean'][-1]:.2e} / "
        f"{tab['displacement_median'][-1]:.2e} | {report.share(round(tab['frozen_fraction'][-1] * 20), 20)} |"
    ) in text
    assert f"step {s.table['step'][13]} (x" in text  # the kick
    losses = measures.curves(wordystore.open(two_runs / "b.zarr"))["losses"]
    assert f"Loss: {losses[1]:.4f} at step 2, {losses[-1]:.4f} at step 38" in text
    assert all(f"({name})" in text for name in plots)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging directory left


def test_compare_prints_config_and_learning_rate_differences(two_runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", str(two_runs / "a.zarr"), str(two_runs / "b.zarr"), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "run.learning_rate: 0.001 -> 0.002" in printed
    assert "note: - -> '<script>'" in printed
    assert not any("output_dir" in line for line in printed.splitlines() if line.startswith("  "))
    assert "first differs at step 20: 1.000e-03 vs 5.000e-04 (10 of 20 common steps differ)" in printed
    assert "largest jump in mean movement of 'odd': A none; B step 26" in printed
    assert {p.name for p in out.iterdir()} >= {"compare.md", "losses.png", "learning_rate.png", "displacement.png"}
    assert all(is_png(p) for p in out.glob("*.png"))


WITHOUT_MATPLOTLIB = (
    "import sys; sys.modules['matplotlib'] = None\nfrom wordystore.cli import main; sys.exit(main(sys.argv[1:]))"
)


def test_report_and_compare_without_matplotlib_write_their_text_and_name_the_plots_not_drawn(two_runs, tmp_path):
    for args, written in (
        (["report", two_runs / "a.zarr"], "report.md"),
        (["compare", two_runs / "a.zarr", two_runs / "b.zarr"], "compare.md"),
    ):
        out = tmp_path / args[0]
        proc = subprocess.run(
            [sys.executable, "-c", WITHOUT_MATPLOTLIB, *map(str, args), "--out", str(out)],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr.strip().splitlines() == [
            f"wordystore {args[0]}: warning: wrote {out / written} without its plots: plots need matplotlib, "
            f"which is not installed; {install_hint('analysis')}"
        ]
        assert proc.stdout.strip().endswith(f"wrote {out / written}")
        assert [p.name for p in out.iterdir()] == [written]  # the text, no image
        text = (out / written).read_text()
        assert "Not drawn: losses.png, learning_rate.png, grad_norm.png, displacement.png" in text
        assert "pip install -e '.[analysis]'" in text and "![" not in text
    assert "| odd | 20 |" in (tmp_path / "report" / "report.md").read_text()
    assert "run.learning_rate: 0.001 -> 0.002" in (tmp_path / "compare" / "compare.md").read_text()


@pytest.mark.parametrize(
    "part, whole, text",
    [
        (0, 5170, "0 %"),
        (1, 5170, "0.019 %"),
        (5169, 5170, "99.981 %"),
        (5170, 5170, "100 %"),
        (1, 3, "33.3 %"),
        (1, 20_000, "0.005 %"),
        (19_999, 20_000, "99.995 %"),
        (1, 100, "1.0 %"),
    ],
)
def test_a_share_reads_0_or_100_percent_only_when_it_is(part, whole, text):
    assert report.share(part, whole) == text


def test_plots_keep_percentages_within_0_to_100_name_the_run_and_label_seams(tmp_path):
    steps = np.arange(10)
    fig = report.plot_lines.__wrapped__(
        "Tokens frozen\nwb1b", "share", {"": [("", steps, np.zeros(10), {})]}, percent=True, seams=[5, 8]
    )
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    assert 0 <= low and high <= 1  # all zeros: not -4 % .. 4 %
    assert fig._suptitle.get_text() == "Tokens frozen\nwb1b"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [report.SEAM_LABEL]  # one entry for both seam lines, with no other label in the plot
    full = report.plot_lines.__wrapped__("t", "share", {"": [("", steps, np.ones(10), {})]}, percent=True)
    assert full.axes[0].get_ylim()[1] <= 1


def test_the_freeze_legend_counts_tokens_as_report_md_does(two_runs, tmp_path):
    t = wordystore.open(two_runs / "b.zarr")
    run = report.analyse(t, "b", progress=False)
    s = run.stats["odd"]
    fig = report.plot_freeze_steps.__wrapped__("When tokens freeze\nb", run.stats)
    legend = [x.get_text() for x in fig.axes[0].get_legend().get_texts()]
    assert (
        f"odd: {s.still_moving:,} of {s.token_ids.size:,} still moving at the end "
        f"({report.share(s.still_moving, s.token_ids.size)})" in legend
    )
    assert f"| {s.still_moving:,} of {s.token_ids.size:,} |" in report.report_markdown(run, [])


def test_failed_reports_leave_nothing_behind(tmp_path, capsys):
    out = tmp_path / "deep" / "rep"
    assert main(["report", str(tmp_path / "missing.zarr"), "--out", str(out)]) == 2
    assert "no trajectory at" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_info_is_concise_and_sizes_are_the_store_files(two_runs, capsys):
    path = two_runs / "a.zarr"
    assert main(["info", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{path}: 20 rows, steps 0..38"
    t = wordystore.open(path)
    sizes = display.kind_sizes(t)
    for name in t.kinds:
        on_disk = sum(
            f.stat().st_size for tier in (path, path / "hot") for f in (tier / name).rglob("*") if f.is_file()
        )
        assert sizes[name] == (on_disk, 20 * t.kinds[name].step_nbytes)
        row = next(line.split() for line in lines if line.split()[:1] == [name])
        assert row[1] == t.kinds[name].dtype and row[-1] == display.ratio(*sizes[name])
    assert "  token sets: even (20), odd (20)" in lines
    assert any(line.startswith("  run: 20 steps, batch 32, lr 0.001 linear") for line in lines)
    assert len(lines) < 20


def test_html_repr(two_runs):
    t = wordystore.open(two_runs / "b.zarr")
    page = t._repr_html_()
    assert all(f"<td style='text-align:left'>{name}</td>" in page for name in t.kinds)
    assert "<details><summary>config</summary>" in page and "&lt;script&gt;" in page and "<script>" not in page
    assert "token sets: even (20), odd (20)" in page
    kind = t.embeddings._repr_html_()
    assert "step: 20, token: 40, dim: 6" in kind and "on disk" in kind


@pytest.fixture(scope="module")
def joined(two_runs):
    """a.zarr (steps 0..38) and a second run (steps 40..78) stitched: a seam at step 40."""
    build(two_runs / "later.zarr", first_step=40, seed=3)
    return stitch([two_runs / "a.zarr", two_runs / "later.zarr"], two_runs / "joined.zarr", progress=False)


def test_seams_of_a_stitched_run_are_found(joined):
    from wordystore.analysis.report import analyse

    assert analyse(joined, "joined", progress=False).seams == [40]


def test_the_docs_example_script_runs_around_a_seam(joined, tmp_path):
    doc = (Path(__file__).parents[1] / "docs" / "analysis.md").read_text()
    script = doc.split("## Example script")[1].split("```python\n")[1].split("```")[0]
    (tmp_path / "around_a_step.py").write_text(script)
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "around_a_step.py"), str(joined.store.root), "odd"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "odd tokens around step 40 (a seam):" and lines[1].startswith("  step    36: median movement")
    assert [line.endswith("<-") for line in lines].index(True) == 3  # steps 36, 38, 40
    assert lines[-1].startswith("  moved most at step 40: token ")


def test_report_on_a_real_trainer_run(tmp_path, capsys):
    from trainer.run import train

    cfg = RunConfig(vocab_size=512, hidden_dim=16, batch_size=4, steps=6, max_seq_len=32)  # every token trained
    train(tmp_path / "run.zarr", cfg, progress=False)
    assert main(["report", str(tmp_path / "run.zarr"), "--out", str(tmp_path / "rep"), "--quiet"]) == 0
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "- run: 6 steps, batch 4, lr 0.001 linear, Adam (0.9, 0.999, 1e-08)" in text
    # Hugging Face's linear schedule as the trainer used it: 1e-3 * (1 - (step - 1) / 6)
    assert "Learning rate used: 1.000e-03 at step 1, 5.000e-04 at step 4, 1.667e-04 at step 6." in text
    assert "| trained | 512 |" in text and "| untrained |" not in text  # the empty set is left out
    with pytest.raises(ValueError, match="token set 'untrained' is empty"):
        measures.embedding_stats(wordystore.open(tmp_path / "run.zarr"), "untrained")
