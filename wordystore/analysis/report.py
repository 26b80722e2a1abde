"""``wordystore report`` and ``wordystore compare``: PNG plots and a short markdown summary of one
trajectory, or of two overlaid, computed by :mod:`wordystore.analysis.measures` while streaming the store.

>>> from wordystore import report
>>> report.write_report("runs/wb1b.zarr", "wb1b-report")            # report.md and PNGs
>>> print(report.write_comparison("runs/wb1.zarr", "runs/wb1b.zarr", "wb1-vs-wb1b").text())

Plots need matplotlib (the ``analysis`` extra); without it the text is written all the same
(report.md, compare.md, the comparison), naming the plots it could not draw. Figures are drawn
with ``matplotlib.figure.Figure`` (the Agg canvas), never pyplot, so a notebook's backend is left alone.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import numpy as np

from wordystore.analysis import measures
from wordystore.analysis.measures import EmbeddingStats, Table
from wordystore.optional import install_hint, missing
from wordystore.read import display, trajectory
from wordystore.read.trajectory import Trajectory
from wordystore.store.storage import describe

STEP_LABEL = "training step"
DISTANCE = "L2 distance, embedding units"
CURVE_LABELS = {  # scalar kind -> (title, y-axis label)
    "losses": ("Training loss", "cross-entropy loss (nats, stored in bfloat16)"),
    "learning_rate": ("Learning rate used at each step", "learning rate"),
    "grad_norm": ("Gradient norm, all parameters", "L2 norm of the gradient"),
}
MOMENT_LABELS = {
    "grads": "gradient",
    "momentum": "Adam 1st moment (exp_avg)",
    "variance": "Adam 2nd moment (exp_avg_sq)",
}
IGNORED_CONFIG_KEYS = ("training_arguments.output_dir", "training_arguments.logging_dir", "summary.train_seconds")

SEAM_LABEL = "seam: a stitched run's next segment, or an extension's first step"


def plots_missing() -> str | None:
    """Why plots cannot be drawn here (matplotlib is not installed), or None."""
    if missing("matplotlib"):
        return f"plots need matplotlib, which is not installed; {install_hint('analysis')}"
    return None


def share(part: int, whole: int) -> str:
    """``part`` of ``whole`` as a percentage that reads 0 % or 100 % only when it is: below 1 % and
    above 99 % to two significant digits of the share or of its complement (1 of 5,170 tokens is
    0.019 %, 5,169 of them 99.981 %)."""
    if whole == 0:
        return "-"
    if part in (0, whole):
        return f"{100 * part // whole} %"
    value = 100 * part / whole
    if 1 <= value <= 99:
        return f"{value:.1f} %"
    if value < 1:
        return f"{value:.2g} %"
    return f"{Decimal(100) - Decimal(f'{100 - value:.2g}')} %"


# -- what a report is made of ---------------------------------------------------------------------------


@dataclass
class Run:
    """One trajectory's analyses: scalar curves, and per token set the embedding statistics and norms."""

    label: str
    t: Trajectory
    curves: Table
    stats: dict[str, EmbeddingStats] = field(default_factory=dict)
    norms: dict[str, Table] = field(default_factory=dict)

    @property
    def seams(self) -> list[int]:
        """First steps of the 2nd, 3rd... segments of a stitched run, and of each extension's new LR policy."""
        extensions = [ext["seam_step"] + 1 for ext in self.t.config.get("extensions", [])]
        return [seg["steps"][0] for seg in self.t.segments[1:]] + extensions


def analyse(t: Trajectory, label: str, progress: bool = True) -> Run:
    """Every analysis the plots need, per token set (every token if the store names none); cached in the store."""
    run = Run(label, t, measures.curves(t))
    sets = [name for name, ids in t.token_sets.items() if ids.size] or [None]  # e.g. no untrained tokens
    emb = t.kinds.get("embeddings")
    if emb is not None and emb.dims[:1] == ("token",) and emb.dtype in measures.LATTICE_DTYPES:
        for name in sets:
            stats = measures.embedding_stats(t, name, progress=progress, cache=True)
            run.stats[stats.tokens] = stats
    if any(t.kinds[k].dims[:1] == ("token",) for k in measures.MOMENT_KINDS if k in t.kinds):
        for name in sets:
            run.norms[name or "all"] = measures.moment_norms(t, name, progress=progress, cache=True)
    return run


def _open(where) -> Trajectory:
    return where if isinstance(where, Trajectory) else trajectory.open(where)


def _name(where) -> str:
    """A short label for a store: its last path component without ``.zarr``."""
    text = describe(where.store) if isinstance(where, Trajectory) else os.fspath(where)
    return Path(text.rstrip("/")).name.removesuffix(".zarr") or "trajectory"


# -- drawing --------------------------------------------------------------------------------------------


Series = tuple[str, np.ndarray, np.ndarray, dict]  # (legend label, steps, values, matplotlib line style)


def _drawn(plot):
    """A plot function that draws where matplotlib is installed; elsewhere it returns the path it
    would have written and writes nothing, so the report lists the plot as not drawn."""

    @functools.wraps(plot)
    def draw(path: Path, *args, **kwargs) -> Path:
        if plots_missing() is None:
            plot(*args, **kwargs).savefig(path)
        return path

    return draw


@_drawn
def plot_lines(
    title: str,
    ylabel: str,
    panels: dict[str, list[Series]],
    *,
    log: bool = False,
    seams: list[int] = (),
    percent: bool = False,
    sharey: bool = True,
):
    """One figure: a panel per entry of ``panels`` (side by side), lines against training step. On a log
    scale, zeros (row 0's gradient, a frozen set's movement) are left out rather than drawn as cliffs;
    a percentage axis stays within [0, 100 %]."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    fig = Figure(figsize=(6.5 + 3.5 * (len(panels) - 1), 4), dpi=110, layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=sharey, squeeze=False)[0]
    for ax, (panel, series) in zip(axes, panels.items()):
        for label, steps, values, style in series:
            ax.plot(steps, np.where(values > 0, values, np.nan) if log else values, label=label, **style)
        for i, step in enumerate(seams):
            ax.axvline(step, color="gray", linestyle=":", linewidth=1, label=None if i else SEAM_LABEL)
        ax.set(title=panel or None, xlabel=STEP_LABEL)
        ax.set_yscale("log" if log else "linear")
        if percent:
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
            low, high = ax.get_ylim()
            ax.set_ylim(max(low, 0.0), min(high, 1.0))
        ax.grid(alpha=0.3)
        if seams or any(label for label, *_ in series):
            ax.legend(fontsize="small")
    axes[0].set_ylabel(ylabel)
    fig.suptitle(title)
    return fig


@_drawn
def plot_hops(title: str, stats: dict[str, EmbeddingStats]):
    """Bars: the share of coordinate-steps (rows after the first) per number of lattice hops, per token set."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(8, 4.2), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    labels = next(iter(stats.values())).hop_bin_labels()
    width = 0.8 / len(stats)
    for i, (name, s) in enumerate(stats.items()):
        counts = s.hop_histogram[1:].sum(axis=0)
        ax.bar(
            np.arange(len(labels)) + (i - (len(stats) - 1) / 2) * width,
            counts / max(counts.sum(), 1),
            width=width,
            label=f"{name} ({s.token_ids.size} tokens)",
        )
    ax.set_xticks(np.arange(len(labels)), labels, rotation=45, ha="right", fontsize="small")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:g}%"))
    ax.set(
        title=title,
        xlabel="representable values moved in one step (hops)\n"
        "a sign change passes every tiny value around 0, so it counts tens of thousands",
        ylabel="share of coordinate-steps",
    )
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small")
    return fig


@_drawn
def plot_freeze_steps(title: str, stats: dict[str, EmbeddingStats]):
    """Per token set, the share of its tokens that froze (never changed again) at each step; the
    legend's count of tokens still moving is report.md's."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    fig = Figure(figsize=(6.5, 4), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    for name, s in stats.items():
        counts = s.freeze_step_counts()
        ax.step(
            counts["step"],
            counts["tokens"] / s.token_ids.size,
            where="mid",
            label=f"{name}: {s.still_moving:,} of {s.token_ids.size:,} still moving at the end "
            f"({share(s.still_moving, s.token_ids.size)})",
        )
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylim(0.0, min(ax.get_ylim()[1], 1.0))
    ax.set(title=title, xlabel=STEP_LABEL, ylabel="tokens of the set freezing at this step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def _curve_plots(out: Path, runs: list[Run], styles: list[dict]) -> list[Path]:
    """Loss, learning rate and gradient norm: one run's (before and after clipping), or runs overlaid
    (before clipping)."""
    paths, seams = [], sorted({step for r in runs for step in r.seams})
    for kind, (title, ylabel) in CURVE_LABELS.items():
        series = [
            (r.label if len(runs) > 1 else "", r.curves["step"], r.curves[kind], s)
            for r, s in zip(runs, styles)
            if kind in r.curves
        ]
        if kind == "grad_norm" and len(runs) == 1 and "grad_norm_clipped" in runs[0].curves:
            c = runs[0].curves
            series = [
                ("before clipping", c["step"], c["grad_norm"], {}),
                ("after clipping", c["step"], c["grad_norm_clipped"], {"linestyle": "--"}),
            ]
        elif kind == "grad_norm":
            title += " (before clipping)"
        if series:
            paths.append(plot_lines(out / f"{kind}.png", _titled(title, runs), ylabel, {"": series}, seams=seams))
    return paths


def _moment_plot(out: Path, runs: list[Run]) -> list[Path]:
    """A panel per moment kind; a line per token set (colour) and run (dashes) that all runs have."""
    sets = [name for name in runs[0].norms if all(name in r.norms for r in runs)]
    kinds = [k for k in MOMENT_LABELS if all(k in r.norms[name] for r in runs for name in sets)]
    if not sets or not kinds:
        return []
    dashes = ["-", "--", ":", "-."]
    panels = {
        MOMENT_LABELS[k]: [
            (
                f"{r.label} [{name}]" if len(runs) > 1 else name,
                r.norms[name]["step"],
                r.norms[name][k],
                {"color": f"C{j}", "linestyle": dashes[i % len(dashes)]},
            )
            for i, r in enumerate(runs)
            for j, name in enumerate(sets)
        ]
        for k in kinds
    }
    seams = sorted({step for r in runs for step in r.seams})
    return [
        plot_lines(
            out / "moment_norms.png",
            _titled("Norms of the gradient and Adam's moments, per token set", runs),
            "L2 norm over the token set's rows (log)",
            panels,
            log=True,
            seams=seams,
            sharey=False,
        )
    ]


def _titled(title: str, runs: list[Run]) -> str:
    """A plot's title with the run it shows (``A vs B`` for a comparison)."""
    return f"{title}\n{' vs '.join(r.label for r in runs)}"


# The embedding plots: (file, title, y label, table column, log scale, percent)
EMBEDDING_PLOTS = (
    (
        "displacement",
        "Distance from the step-0 embedding (median over tokens)",
        DISTANCE,
        "displacement_median",
        False,
        False,
    ),
    ("movement", "Step-to-step movement (mean over tokens)", DISTANCE + " (log)", "movement_mean", True, False),
    (
        "frozen_fraction",
        "Tokens frozen: unchanged since the previous step",
        "tokens, bit-identical",
        "frozen_fraction",
        False,
        True,
    ),
)


# -- report ---------------------------------------------------------------------------------------------


def write_report(store, out=None, *, progress: bool = True) -> Path:
    """Analyse ``store`` and write ``report.md`` and its PNGs into ``out`` (default ``./<name>-report``).

    Everything is written to a temporary sibling directory first, so a failure leaves nothing behind.
    Without matplotlib, report.md is written all the same and names the plots it could not draw.
    """
    t = _open(store)
    out = Path(out) if out is not None else Path(f"{_name(store)}-report")
    run = analyse(t, _name(store), progress)
    with _staging(out) as tmp:
        plots = _curve_plots(tmp, [run], [{}])
        for file, title, ylabel, column, log, percent in EMBEDDING_PLOTS:
            series = [(name, s.table["step"], s.table[column], {}) for name, s in run.stats.items()]
            if column == "displacement_median":  # the report draws the maximum too: its title says so
                title = title.replace("(median over tokens)", "(median over tokens; dashed: the maximum)")
                series += [
                    (
                        f"{name} (max)",
                        s.table["step"],
                        s.table["displacement_max"],
                        {"linestyle": "--", "color": f"C{i}"},
                    )
                    for i, (name, s) in enumerate(run.stats.items())
                ]
            if series:
                plots.append(
                    plot_lines(
                        tmp / f"{file}.png",
                        _titled(title, [run]),
                        ylabel,
                        {"": series},
                        log=log,
                        percent=percent,
                        seams=run.seams,
                    )
                )
        if run.stats:
            plots.append(
                plot_hops(
                    tmp / "lattice_hops.png",
                    _titled("bfloat16 lattice hops per coordinate per step (all steps)", [run]),
                    run.stats,
                )
            )
            plots.append(
                plot_freeze_steps(
                    tmp / "freeze_steps.png", _titled("When tokens freeze (last change, bit for bit)", [run]), run.stats
                )
            )
        plots += _moment_plot(tmp, [run])
        (tmp / "report.md").write_text(report_markdown(run, plots))
    return out / "report.md"


def report_markdown(run: Run, plots: list[Path]) -> str:
    """report.md; ``plots`` are the PNGs of the report, those not written (no matplotlib) listed as such."""
    t, c = run.t, run.curves
    sizes = display.kind_sizes(t)
    disk, raw = display.stored_bytes(t), sum(r for _, r in sizes.values())
    lines = [
        f"# {run.label}",
        "",
        f"`{describe(t.store)}`: {len(t)} rows, {display.steps_span(t)}; "
        f"{display.human_bytes(disk)} on disk, {display.human_bytes(raw)} raw ({display.ratio(disk, raw)}).",
        "",
    ]
    lines += [f"- {line}" for line in display.config_summary(t.config)]
    if "losses" in c and len(t) > 1 and not np.isnan(c["losses"][1:]).all():
        first, last = c["losses"][1], c["losses"][-1]
        lines += [
            "",
            f"Loss: {first:.4f} at step {c['step'][1]}, {last:.4f} at step {c['step'][-1]} "
            f"(reduction {first - last:.4f}); lowest {np.nanmin(c['losses']):.4f} "
            f"at step {c['step'][np.nanargmin(c['losses'])]}.",
        ]
    if "learning_rate" in c:
        lines += ["", f"Learning rate used: {schedule_text(schedule_picks(c))}."]
    if run.stats:
        lines += [
            "",
            f"## Token sets (steps {t.steps[0]} to {t.steps[-1]})",
            "",
            "| token set | tokens | displacement max / mean / median | frozen at the end | median freeze step "
            "| still moving | centroid norm | mean radius | max radius | largest jump in movement |",
            "|---|---:|---|---:|---:|---:|---|---|---|---|",
        ]
        for name, s in run.stats.items():
            tab = s.table
            frozen = s.freeze_step[s.freeze_step >= 0]
            jump = measures.largest_jump(tab["movement_mean"], tab["step"])
            lines.append(
                f"| {name} | {s.token_ids.size} | {tab['displacement_max'][-1]:.2e} / "
                f"{tab['displacement_mean'][-1]:.2e} / {tab['displacement_median'][-1]:.2e} | "
                f"{_frozen_share(tab['frozen_fraction'][-1], s.token_ids.size)} | "
                f"{np.sort(frozen)[(frozen.size - 1) // 2] if frozen.size else '-'} | "
                f"{s.still_moving:,} of {s.token_ids.size:,} | "
                + " | ".join(
                    f"{tab[k][0]:.6f} → {tab[k][-1]:.6f}" for k in ("centroid_norm", "radius_mean", "radius_max")
                )
                + f" | {f'step {jump[0]} (x{jump[1]:.1f})' if jump else 'none'} |"
            )
        lines += [
            "",
            "Displacement is each token's L2 distance from its step-0 embedding at the last step; "
            "centroid and radii are shown at the first → last step; a jump is the largest step-to-step "
            "growth of the mean movement after the first steps (a resumed run's kick).",
        ]
    lines += ["", "## Plots", "", *plots_markdown(plots)]
    return "\n".join(lines) + "\n"


def plots_markdown(plots: list[Path]) -> list[str]:
    """An image line per plot written, and a line naming those not drawn and why."""
    lines = [f"![{p.stem}]({p.name})" for p in plots if p.exists()]
    not_drawn = [p.name for p in plots if not p.exists()]
    if not_drawn:
        lines.append(f"Not drawn: {', '.join(not_drawn)} ({plots_missing()}).")
    return lines


def _frozen_share(fraction: float, tokens: int) -> str:
    return "-" if np.isnan(fraction) else share(round(fraction * tokens), tokens)


def schedule_picks(curves: Table) -> list[list]:
    """``[[step, learning rate], ...]`` used at the first, middle and last steps after row 0 (which has none)."""
    steps, lr = curves["step"], curves["learning_rate"]
    rows = np.flatnonzero(~np.isnan(lr))
    if rows.size == 0:
        return []
    return [[int(steps[i]), float(lr[i])] for i in sorted({rows[0], rows[rows.size // 2], rows[-1]})]


def schedule_text(picks: list[list]) -> str:
    return ", ".join(f"{lr:.3e} at step {step}" for step, lr in picks) or "not recorded"


# -- compare --------------------------------------------------------------------------------------------


def write_comparison(a, b, out=None, *, progress: bool = True) -> Comparison:
    """Overlay two trajectories' plots into ``out`` (default ``./<a>-vs-<b>``) and write ``compare.md``.
    Returns the :class:`Comparison` (config differences, the learning rates actually used, the
    largest jumps in movement; ``text()`` is what ``wordystore compare`` prints, ``to_dict()`` its
    ``--json``). Without matplotlib, compare.md is written all the same, naming the plots not drawn."""
    ta, tb = _open(a), _open(b)
    label_a, label_b = _name(a), _name(b)
    if label_a == label_b:
        label_a, label_b = f"A: {label_a}", f"B: {label_b}"
    out = Path(out) if out is not None else Path(f"{_name(a)}-vs-{_name(b)}")
    runs = [analyse(ta, label_a, progress), analyse(tb, label_b, progress)]
    styles = [{"color": "C0"}, {"color": "C1", "linestyle": "--"}]
    comparison = Comparison.of(runs)
    with _staging(out) as tmp:
        plots = _curve_plots(tmp, runs, styles)
        seams = sorted({step for r in runs for step in r.seams})
        common = [name for name in runs[0].stats if name in runs[1].stats]
        for file, title, ylabel, column, log, percent in EMBEDDING_PLOTS:
            panels = {
                name: [
                    (r.label, r.stats[name].table["step"], r.stats[name].table[column], s) for r, s in zip(runs, styles)
                ]
                for name in common
            }
            if panels:
                plots.append(
                    plot_lines(
                        tmp / f"{file}.png", _titled(title, runs), ylabel, panels, log=log, percent=percent, seams=seams
                    )
                )
        plots += _moment_plot(tmp, runs)
        (tmp / "compare.md").write_text(
            "\n".join([f"# {label_a} vs {label_b}", "", "```", comparison.text(), "```", "", *plots_markdown(plots)])
            + "\n"
        )
        comparison.plots = [p.name for p in plots if p.exists()]
        comparison.not_drawn = [p.name for p in plots if not p.exists()]
    comparison.out = str(out)
    return comparison


@dataclass
class Comparison:
    """What ``wordystore compare`` finds: each run's extent, their config differences, the learning
    rate each used and where they first differ, and the largest jump in movement per token set."""

    runs: list[dict]  # per run: tag (A, B), store, rows, steps [first, last], numerics line (or None)
    config_differences: list[dict]  # {"key": dotted key, "a": value, "b": value}; a side without the leaf lacks its key
    learning_rate: dict  # "A", "B": [[step, lr], ...] at the first, middle and last steps; "first_difference": ...
    jumps: dict[str, dict]  # token set -> {"A": [step, ratio] or None, "B": ...}
    out: str | None = None  # the directory written
    plots: list[str] = field(default_factory=list)  # the PNGs written
    not_drawn: list[str] = field(default_factory=list)  # the PNGs not drawn (no matplotlib)

    @classmethod
    def of(cls, runs: list[Run]) -> Comparison:
        a, b = runs
        extent = [
            {
                "tag": tag,
                "store": describe(r.t.store),
                "rows": len(r.t),
                "steps": [int(r.t.steps[0]), int(r.t.steps[-1])] if len(r.t) else [],
                "numerics": display.numerics_line(r.t.config["numerics"]) if "numerics" in r.t.config else None,
            }
            for tag, r in zip("AB", runs)
        ]
        lr = {tag: schedule_picks(r.curves) if "learning_rate" in r.curves else None for tag, r in zip("AB", runs)}
        lr["first_difference"] = (
            first_difference(a.curves, b.curves, "learning_rate")
            if all("learning_rate" in r.curves for r in runs)
            else None
        )
        jumps = {name: {tag: _jump(r.stats[name]) for tag, r in zip("AB", runs)} for name in a.stats if name in b.stats}
        return cls(extent, config_differences(a.t.config, b.t.config), lr, jumps)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def text(self) -> str:
        lines = [
            f"{r['tag']}: {r['store']}: {r['rows']} rows, "
            + (f"steps {r['steps'][0]}..{r['steps'][1]}" if r["steps"] else "no steps yet")
            + (f"; {r['numerics']}" if r["numerics"] else "")
            for r in self.runs
        ] + [""]
        diffs = self.config_differences
        lines.append(
            f"config differences ({len(diffs)}; ignoring {', '.join(IGNORED_CONFIG_KEYS)}):"
            if diffs
            else "configs are identical (ignoring output paths and timings)"
        )
        shown = 40
        lines += [f"  {d['key']}: {_value(d, 'a')} -> {_value(d, 'b')}" for d in diffs[:shown]]
        if len(diffs) > shown:
            lines.append(f"  ... and {len(diffs) - shown} more (wordystore info --config shows each whole)")
        lines += ["", "learning rate used (the stored learning_rate kind):"]
        for tag in "AB":
            picks = self.learning_rate[tag]
            lines.append(f"  {tag}: {schedule_text(picks) if picks is not None else 'not recorded'}")
        if self.learning_rate["first_difference"] is not None:
            lines.append("  " + difference_text(self.learning_rate["first_difference"]))
        for name, jumps in self.jumps.items():
            lines.append(
                f"largest jump in mean movement of '{name}': "
                + "; ".join(f"{tag} {f'step {j[0]} (x{j[1]:.1f})' if j else 'none'}" for tag, j in jumps.items())
            )
        return "\n".join(lines)


def _jump(stats: EmbeddingStats) -> list | None:
    jump = measures.largest_jump(stats.table["movement_mean"], stats.table["step"])
    return [int(jump[0]), float(jump[1])] if jump else None


def first_difference(a: Table, b: Table, column: str) -> dict:
    """Where ``column`` first differs between two tables, over their common steps: ``{"common_steps",
    "differing_steps", "step", "a", "b"}`` (the last three None where nothing differs)."""
    steps, ia, ib = np.intersect1d(a["step"], b["step"], return_indices=True)
    va, vb = a[column][ia], b[column][ib]
    differ = np.flatnonzero(~np.isclose(va, vb, rtol=1e-6, atol=0, equal_nan=True))
    first = (
        {"step": int(steps[differ[0]]), "a": float(va[differ[0]]), "b": float(vb[differ[0]])}
        if differ.size
        else {"step": None, "a": None, "b": None}
    )
    return {"common_steps": int(steps.size), "differing_steps": int(differ.size), **first}


def difference_text(d: dict) -> str:
    if d["common_steps"] == 0:
        return "no steps in common"
    if d["differing_steps"] == 0:
        return f"identical at all {d['common_steps']} common steps"
    return (
        f"first differs at step {d['step']}: {d['a']:.3e} vs {d['b']:.3e} "
        f"({d['differing_steps']} of {d['common_steps']} common steps differ)"
    )


def config_differences(a: dict, b: dict) -> list[dict]:
    """``{"key": dotted key, "a": A's value, "b": B's value}`` for every leaf that differs; a side
    that lacks the leaf lacks its key."""
    fa, fb = _flatten(a), _flatten(b)
    out = []
    for key in sorted(set(fa) | set(fb)):
        if key in IGNORED_CONFIG_KEYS or (key in fa and key in fb and fa[key] == fb[key]):
            continue
        out.append({"key": key, **({"a": fa[key]} if key in fa else {}), **({"b": fb[key]} if key in fb else {})})
    return out


def _value(difference: dict, side: str) -> str:
    if side not in difference:
        return "-"
    text = repr(difference[side])
    return text if len(text) <= 60 else text[:57] + "..."


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list) and value and all(isinstance(v, (dict, list)) for v in value):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return {prefix: value}
    flat = {}
    for key, v in items:
        flat.update(_flatten(v, f"{prefix}.{key}" if prefix else str(key)))
    return flat


# -- output ---------------------------------------------------------------------------------------------


class _staging:
    """A temporary directory beside ``out``; on success its files move into ``out`` (created if need be),
    on failure it is removed, so a failed command leaves nothing behind."""

    def __init__(self, out: Path):
        self.out = out
        self.tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        # the outermost directory this creates: removed whole on failure
        self.created = next((p for p in (*reversed(self.tmp.parents), self.tmp) if not p.exists()), self.tmp)

    def __enter__(self) -> Path:
        if self.out.exists() and not self.out.is_dir():
            raise FileExistsError(f"{self.out} exists and is not a directory; pass another --out")
        self.tmp.mkdir(parents=True, exist_ok=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.created, ignore_errors=True)
            return
        self.out.mkdir(exist_ok=True)
        for path in self.tmp.iterdir():
            path.replace(self.out / path.name)
        self.tmp.rmdir()
