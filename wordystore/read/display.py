"""Describing a trajectory to a person: ``wordystore info`` (text) and Jupyter's HTML repr.

>>> from wordystore import display
>>> print(display.info_text(t))     # kinds, shapes, steps, integrity, token sets, size on disk vs raw, config
>>> display.kind_sizes(t)["embeddings"]   # (bytes on disk, raw bytes)

Sizes are measured through the zarr Store API (every key of a kind's two tiers, ``<kind>/`` and
``hot/<kind>/``), whatever the chunk layout; raw bytes are the committed rows' uncompressed size.
The integrity line (:func:`integrity`) is cheap: it reads ``verified.json`` and lists keys, and
decodes nothing (``wordystore verify`` decodes every chunk).
"""

from __future__ import annotations

import html
import json
from typing import TYPE_CHECKING

from wordystore.errors import FormatError
from wordystore.format.keys import TIERS, VERIFIED_KEY
from wordystore.pools import WriterPools
from wordystore.store import json_documents, storage
from wordystore.store.storage import describe

if TYPE_CHECKING:  # display is the trajectory's presentation: trajectory.py imports it, not the reverse
    from wordystore.read.trajectory import KindView, Trajectory


def stored_bytes(t: Trajectory, prefix: str = "") -> int:
    """Bytes of every key under ``prefix`` in the trajectory's store (``""``: the whole store)."""
    return storage.size(t.store, prefix)


def kind_bytes(t: Trajectory, name: str) -> tuple[int, int]:
    """(bytes on disk in both tiers, raw bytes of the committed rows) of one kind."""
    disk = sum(stored_bytes(t, f"{layout.path}/") for layout in t.layouts[name])
    return disk, len(t) * t.kinds[name].step_nbytes


def kind_sizes(t: Trajectory) -> dict[str, tuple[int, int]]:
    """Per kind: (bytes on disk, raw bytes of the committed rows)."""
    return {name: kind_bytes(t, name) for name in t.kinds}


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def ratio(disk: int, raw: int) -> str:
    return f"{raw / disk:.1f}x" if disk else "-"


def steps_span(t: Trajectory) -> str:
    steps = t.steps
    return f"steps {steps[0]}..{steps[-1]}" if len(steps) else "no steps yet"


# The trainer's parameters (its RunConfig), which it stores as config["run"].
TRAINER_RUN_KEYS = {
    "steps",
    "batch_size",
    "learning_rate",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "weight_decay",
    "seed",
    "record_every",
    "hidden_dim",
    "n_layer",
    "n_head",
    "max_seq_len",
    "init_scale",
}


def config_summary(config: dict) -> list[str]:
    """A few lines on what was run: the trainer's parameters, data, stitch segments or import source."""
    lines = []
    params, args = config.get("run"), config.get("training_arguments") or {}
    if not (isinstance(params, dict) and TRAINER_RUN_KEYS <= set(params)):
        params = None  # not the trainer's: shown with the other entries below
    if params:
        warmup = args.get("warmup_steps") or args.get("warmup_ratio")
        schedule = " ".join(str(x) for x in (args.get("lr_scheduler_type"), warmup and f"(warmup {warmup})") if x)
        lines.append(
            f"run: {params['steps']} steps, batch {params['batch_size']}, lr {params['learning_rate']:g}"
            f"{' ' * bool(schedule)}{schedule}, Adam ({params['adam_beta1']}, {params['adam_beta2']}, "
            f"{params['adam_epsilon']:g}), weight decay {params['weight_decay']:g}, "
            f"grad clip {args.get('max_grad_norm')}, "
            f"seed {params['seed']}, recorded every {params['record_every']}, device {config.get('device')}"
        )
        lines.append(
            f"model: dim {params['hidden_dim']}, {params['n_layer']} layers, {params['n_head']} heads, "
            f"sequence {params['max_seq_len']}, init N(0, {params['init_scale']})"
        )
        data = config.get("data")
        if isinstance(data, dict):
            lines.append(
                f"data: {data.get('corpus')} ({data.get('corpus_tokens')} tokens), tokenizer {data.get('tokenizer')}"
            )
    numerics = config.get("numerics")  # wordystore train --bf16-matmul
    if isinstance(numerics, dict) and "bf16_matmul" in numerics:
        lines.append(numerics_line(numerics))
    for seg in config.get("segments", []):
        lines.append(
            f"segment: rows {seg['rows'][0]}..{seg['rows'][1] - 1}, steps {seg['steps'][0]}..{seg['steps'][1]} "
            f"from {seg['source']}"
        )
    for ext in config.get("extensions", []):  # wordystore train --extend-to
        lines.append(
            f"extension: steps {ext['seam_step'] + 1}..{ext['to_step']}, lr policy {ext['lr_policy']} "
            f"(seam after step {ext['seam_step']}, whose lr was {ext['seam_lr']:g})"
        )
    if "imported_from" in config:
        lines.append(f"imported from {config['imported_from']}")
    if "seed_scalars" in config and not params:
        lines.append(
            "scalars: "
            + ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in config["seed_scalars"].items())
        )
    known = {"segments", "stitched_from", "imported_from", "seed_scalars"}
    if params:
        known |= {"run", "training_arguments", "model", "data", "device", "summary", "extensions", "numerics"}
    other = [key for key in config if key not in known]
    if other:
        lines.append("config: " + ", ".join(_short(key, config[key]) for key in other))
    return lines


def numerics_line(numerics: dict) -> str:
    """``numerics: bf16 matmul float32 (auto: ...); CPU avx2 (...)`` from a store's ``config["numerics"]``."""
    cpu = numerics.get("cpu") or {}
    return (
        f"numerics: bf16 matmul {numerics['bf16_matmul']} ({numerics.get('reason')}); "
        f"CPU {cpu.get('description') or cpu.get('class')}"
    )


def _short(key: str, value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return f"{key}={text if len(text) <= 40 else text[:37] + '...'}"


def _rows(t: Trajectory) -> list[tuple[str, str, str, str, str, str]]:
    """(kind, dtype, shape, on disk, raw, ratio) per kind, then the total."""
    sizes = kind_sizes(t)
    rows = [
        (
            name,
            kind.dtype,
            "[" + ", ".join(str(n) for n in t[name].shape) + "]",
            human_bytes(sizes[name][0]),
            human_bytes(sizes[name][1]),
            ratio(*sizes[name]),
        )
        for name, kind in t.kinds.items()
    ]
    disk, raw = stored_bytes(t), sum(r for _, r in sizes.values())
    rows.append(("total", "", "", human_bytes(disk), human_bytes(raw), ratio(disk, raw)))
    return rows


def _token_sets(t: Trajectory) -> str:
    return ", ".join(f"{name} ({len(ids)})" for name, ids in t.token_sets.items()) or "none"


def integrity(t: Trajectory) -> str:
    """When the store was last verified, and whether a shard that committed rows need is missing."""
    missing = missing_shards(t)
    line = verification_status(t)
    if missing:
        line = (
            f"DAMAGED: {len(missing)} shard(s) of committed rows are missing (e.g. {missing[0]}); "
            f"run `wordystore verify {describe(t.store)}`; {line}"
        )
    return line


def verification_status(t: Trajectory) -> str:
    """One line on when the trajectory ``t`` was last verified (from ``verified.json``)."""
    try:
        doc = json_documents.read_json(t.store, VERIFIED_KEY)
        rows, time, problems = doc["committed_rows"], doc["time"], doc["problems"]
    except (FormatError, TypeError, KeyError):
        return "never verified (`wordystore verify` checks every chunk)"
    found = "no problems" if problems == 0 else f"{problems} problem{'s' * (problems != 1)} found"
    if rows == len(t):
        return f"verified {time}: {found}"
    if rows < len(t):
        return f"not verified since rows were added (verified {time} at {rows} rows: {found})"
    return f"not verified since the commit record changed (verified {time} at {rows} rows: {found})"


def missing_shards(t: Trajectory) -> list[str]:
    """The shard keys the committed rows of ``t`` need that the store lacks: a cheap check of the
    trajectory's integrity (it lists keys, decodes nothing). A writer compacting meanwhile may
    delete hot shards: if any are missing, the check is made again after ``t.refresh()``."""
    for attempt in range(2):
        present = set(storage.list_prefix(t.store, ""))
        rows = t.commit_record.tiers
        needed = [
            layout.shard_key(coords)
            for pair in t.layouts.values()
            for layout, tier in zip(pair, TIERS)
            for coords, _, _ in layout.shards_holding(*rows.span(tier))
        ]
        missing = [key for key in needed if key not in present]
        if not missing or attempt:
            return missing
        t.refresh()
    return missing


def info_text(t: Trajectory) -> str:
    """What ``wordystore info`` prints."""
    lines = [f"{describe(t.store)}: {len(t)} rows, {steps_span(t)}", f"  {integrity(t)}"]
    header = ("kind", "dtype", "shape [step, ...]", "on disk", "raw", "ratio")
    table = [header, *_rows(t)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        cells = [c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  " + "  ".join(cells).rstrip())
    lines.append(f"  token sets: {_token_sets(t)}")
    if t.commit_record.writer is not None:
        lines.append(f"  {writer_line(t.commit_record.writer)}")
    lines.extend("  " + line for line in config_summary(t.config))
    return "\n".join(lines)


def info_dict(t: Trajectory) -> dict:
    """What ``wordystore info --json`` prints: the facts of :func:`info_text` (sizes in bytes), and the config."""
    sizes = kind_sizes(t)
    return {
        "store": describe(t.store),
        "rows": len(t),
        "steps": [int(t.steps[0]), int(t.steps[-1])] if len(t) else [],
        "profile": t.profile,
        "integrity": integrity(t),
        "kinds": {
            name: {
                "dtype": kind.dtype,
                "shape": [len(t), *kind.shape],
                "dims": ["step", *kind.dims],
                "bytes_on_disk": sizes[name][0],
                "raw_bytes": sizes[name][1],
            }
            for name, kind in t.kinds.items()
        },
        "bytes_on_disk": stored_bytes(t),
        "token_sets": {name: len(ids) for name, ids in t.token_sets.items()},
        "summary": config_summary(t.config),
        **({"writer": t.commit_record.writer} if t.commit_record.writer is not None else {}),
        "config": t.config,
    }


def writer_line(doc: dict) -> str:
    """``writer: 1 write thread, ...`` from the commit record's ``writer`` (the pools that wrote it)."""
    try:
        return f"writer: {WriterPools.from_dict(doc).describe()}"
    except (KeyError, TypeError, ValueError):
        return f"writer: {doc!r}"


def trajectory_html(t: Trajectory) -> str:
    """The notebook view of a trajectory: a kinds table with sizes, token sets, config folded."""
    e = html.escape
    head = "".join(
        f"<th style='text-align:{'left' if i < 3 else 'right'}'>{e(h)}</th>"
        for i, h in enumerate(("kind", "dtype", "shape [step, ...]", "on disk", "raw", "ratio"))
    )
    body = "".join(
        "<tr>"
        + "".join(f"<td style='text-align:{'left' if i < 3 else 'right'}'>{e(c)}</td>" for i, c in enumerate(row))
        + "</tr>"
        for row in _rows(t)
    )
    summary = "".join(f"<li>{e(line)}</li>" for line in config_summary(t.config))
    return (
        f"<div class='wordystore-trajectory'><b>wordystore.Trajectory</b> <code>{e(describe(t.store))}</code>: "
        f"{len(t)} rows, {e(steps_span(t))}"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        f"<div>token sets: {e(_token_sets(t))}</div><ul>{summary}</ul>"
        f"<details><summary>config</summary><pre>{e(json.dumps(t.config, indent=1))}</pre></details></div>"
    )


def kind_html(view: KindView) -> str:
    """The notebook view of one kind: dims, shape, dtype, steps, size on disk (both tiers, as ``info``) and ratio."""
    e = html.escape
    disk, raw = kind_bytes(view.trajectory, view.name)
    dims = ", ".join(f"{d}: {n}" for d, n in zip(view.dims, view.shape))
    return (
        f"<div class='wordystore-kind'><b>KindView</b> <code>{e(view.name)}</code> {e(view.kind.dtype)} [{e(dims)}], "
        f"{e(steps_span(view.trajectory))}; {human_bytes(disk)} on disk, "
        f"{human_bytes(raw)} raw ({ratio(disk, raw)})</div>"
    )
