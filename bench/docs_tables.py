"""Write the benchmark's figures into the docs: every block of README.md and docs/*.md marked

    <!-- bench: SECTION[; SECTION ...] -->
    ...
    <!-- /bench -->

(semicolons between sections: their names have commas) is replaced by the rows of those sections
of one ``python -m bench`` run (``bench/results/latest.json``, which :func:`bench.table.write_results`
writes), as a table under a line naming the run. A figure
then comes from one run and is written once, so it cannot differ between files.

Every other figure of those files stands between ``<!-- quoted: WHERE IT COMES FROM -->`` and
``<!-- /quoted -->`` (a measurement's date, machine and command, or the setting or target it
states). :func:`uncovered` finds the figures that stand in neither (docs/targets.md, "Where the
figures come from").

    python -m bench --write-docs                       # from bench/results/latest.json
    python -m bench.docs_tables bench/results/quick.json
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LATEST = ROOT / "bench" / "results" / "latest.json"
BLOCK = re.compile(r"(<!-- bench: (?P<sections>[^>]+?) -->\n).*?(<!-- /bench -->)", re.S)
QUOTED = re.compile(r"<!-- quoted: (?P<source>[^>]*?) -->.*?<!-- /quoted -->", re.S)
# What counts as a figure: a number (digits, thousands commas, a decimal part) with a unit of time,
# size or rate after it, or %, or x right after it (a ratio; "50,257 x 64" is a shape). A number of
# steps, rows or threads is not one.
FIGURE = re.compile(
    r"(?<![\w.,/])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
    r"(?:[x×]|\s?(?:%|[kKMGT]i?B(?:/s)?|ms|µs|ns|s|seconds?|min|minutes?|h|hours?|rows/s|steps/s))(?![\w/])"
)
# Where a figure is no claim of a measurement: fenced code and `code`, and a bound after a comparison
# (a target, "<= 3 s", or a limit).
NOT_PROSE = re.compile(r"^```.*?^```$|`[^`\n]*`", re.M | re.S)
BOUND = re.compile(r"(?:<=|>=|≤|≥|<|(?<!-)>)\s*[+-]?$")


def documents(root: Path = ROOT) -> list[Path]:
    """README.md and every docs/*.md."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def prose(text: str) -> str:
    """``text`` with its code blanked out, same length: a marker shown in code marks nothing."""
    return NOT_PROSE.sub(lambda m: " " * len(m[0]), text)


def blocks(text: str) -> list[tuple[list[str], int, int]]:
    """(sections, start, end) of the body of every bench block of ``text``, outside code."""
    return [([s.strip() for s in m["sections"].split(";")], m.end(1), m.start(3)) for m in BLOCK.finditer(prose(text))]


def render(results: dict, sections: list[str]) -> str:
    """The rows of ``sections``, in the run's order, as a markdown table under a line naming the run;
    with a section column where there are several (a read's rows differ only in their section)."""
    known = {r["section"] for r in results["rows"]}
    unknown = [s for s in sections if s not in known]
    if unknown:
        raise ValueError(f"sections {unknown} are not in the results; they have {sorted(known)}")
    machine = next((r["ours"] for r in results["rows"] if r["section"] == "machine"), None)
    run = "; ".join(filter(None, [results["written"][:10], results["header"], machine and f"CPU {machine}"]))
    columns = ["section"] * (len(sections) > 1) + ["measure", "baseline", "wordystore", "ratio", "target", "met"]
    lines = [f"`python -m bench` ({run}):", "", f"| {' | '.join(columns)} |", "|---" * len(columns) + "|"]
    for r in results["rows"]:
        if r["section"] in sections:
            met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
            cells = [r["section"]] * (len(sections) > 1) + [r["measure"], r["baseline"], r["ours"], r["ratio"]]
            lines.append(f"| {' | '.join(cells + [r['target'], met])} |")
    return "\n".join(lines) + "\n"


def uncovered(text: str) -> list[tuple[int, str]]:
    """(line, figure) of every figure of a document's ``text`` outside its bench blocks and quoted
    parts, outside code and not a bound; a quoted part that does not say where its figures come
    from covers nothing."""
    hidden = [m.span() for m in NOT_PROSE.finditer(text)]
    hidden += [(start, end) for _, start, end in blocks(text)]
    hidden += [m.span() for m in QUOTED.finditer(prose(text)) if m["source"].strip()]
    found = []
    for match in FIGURE.finditer(text):
        start = match.start()
        if any(a <= start < b for a, b in hidden) or BOUND.search(text[max(0, start - 4) : start]):
            continue
        found.append((text.count("\n", 0, start) + 1, match[0]))
    return found


def stale(results: dict, paths: list[Path]) -> list[str]:
    """``FILE: SECTIONS`` of every bench block of ``paths`` that differs from what ``results`` writes."""
    found = []
    for path in paths:
        text = path.read_text()
        for sections, start, end in blocks(text):
            if text[start:end] != render(results, sections):
                found.append(f"{path.name}: {'; '.join(sections)}")
    return found


def write_docs(results_path: Path, paths: list[Path]) -> list[Path]:
    """Rewrite every marked block of ``paths`` from the results at ``results_path``; returns the files
    that changed. Every block is rendered before any file is written: a bad one changes nothing."""
    if not results_path.is_file():
        raise ValueError(f"{results_path} does not exist; expected the results of a run: python -m bench writes them")
    results = json.loads(results_path.read_text())
    texts = {}
    for path in paths:
        old = new = path.read_text()
        for sections, start, end in reversed(blocks(old)):  # from the end: earlier offsets stay valid
            try:
                new = new[:start] + render(results, sections) + new[end:]
            except ValueError as exc:
                raise ValueError(f"{path.name}: {exc}") from None
        if new != old:
            texts[path] = new
    for path, text in texts.items():
        path.write_text(text)
    return list(texts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    results = Path(argv[0]) if argv else LATEST
    try:
        changed = write_docs(results, documents())
    except ValueError as exc:
        print(f"python -m bench --write-docs: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote the tables of {results} into {', '.join(p.name for p in changed) or 'no file (already current)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
