"""The benchmark's one table: every row a measure against a baseline measured in the same run."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ("section", "measure", "baseline", "ours", "ratio", "target", "met")
ROWS: list[tuple] = []  # one tuple of FIELDS per row: texts, and met (True, False or None: no target)


def row(section, measure, baseline, ours, ratio, target="", met=None):
    met = None if met is None else bool(met)  # a numpy comparison's bool too
    ROWS.append((section, measure, baseline, ours, ratio, target, met))
    mark = "" if met is None else (" ok" if met else " MISSED")
    print(f"  {measure}: {ours} vs {baseline} -> {ratio} {target}{mark}", flush=True)


def write_results(name: str, header: str = "") -> Path:
    """Print the table and write it to ``bench/results/<name>.md`` (after ``header``, if any), and its
    rows to ``<name>.json``, from which ``python -m bench --write-docs`` writes the docs' tables."""
    lines = ["| section | measure | baseline | wordystore | ratio | target | met |", "|---|---|---|---|---|---|---|"]
    for section, measure, baseline, ours, ratio, target, met in ROWS:
        lines.append(
            f"| {section} | {measure} | {baseline} | {ours} | {ratio} | {target} | "
            f"{'' if met is None else ('yes' if met else '**no**')} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text((header + "\n\n" if header else "") + table + "\n")
    document = {
        "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "header": header,
        "rows": [dict(zip(FIELDS, r)) for r in ROWS],
    }
    path.with_suffix(".json").write_text(json.dumps(document, indent=1) + "\n")  # for python -m bench --write-docs
    return path
