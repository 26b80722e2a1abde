"""The benchmark's one table: every row a measure against a baseline measured in the same run."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROWS: list[tuple] = []  # (section, measure, baseline, ours, ratio text, target text, met)


def row(section, measure, baseline, ours, ratio, target="", met=None):
    ROWS.append((section, measure, baseline, ours, ratio, target, met))
    mark = "" if met is None else (" ok" if met else " MISSED")
    print(f"  {measure}: {ours} vs {baseline} -> {ratio} {target}{mark}", flush=True)


def write_results(name: str, header: str = "") -> Path:
    """Print the table and write it to ``bench/results/<name>.md`` (after ``header``, if any)."""
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
    return path
