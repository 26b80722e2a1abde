"""Write the benchmark's figures into the docs: every block of README.md and docs/*.md marked

    <!-- bench: SECTION[, SECTION ...] -->
    ...
    <!-- /bench -->

is replaced by the rows of those sections of one ``python -m bench`` run (``bench/results/latest.json``,
which :func:`bench.table.write_results` writes), as a table under a line naming the run. A figure
then comes from one run and is written once, so it cannot differ between files.

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


def documents(root: Path = ROOT) -> list[Path]:
    """README.md and every docs/*.md."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def render(results: dict, sections: list[str]) -> str:
    """The rows of ``sections``, in the run's order, as a markdown table under a line naming the run."""
    known = {r["section"] for r in results["rows"]}
    unknown = [s for s in sections if s not in known]
    if unknown:
        raise ValueError(f"sections {unknown} are not in the results; they have {sorted(known)}")
    machine = next((r["ours"] for r in results["rows"] if r["section"] == "machine"), None)
    run = "; ".join(filter(None, [results["written"][:10], results["header"], machine and f"CPU {machine}"]))
    lines = [f"`python -m bench` ({run}):", "", "| measure | baseline | wordystore | ratio | target | met |"]
    lines.append("|---|---|---|---|---|---|")
    for r in results["rows"]:
        if r["section"] in sections:
            met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
            lines.append(f"| {r['measure']} | {r['baseline']} | {r['ours']} | {r['ratio']} | {r['target']} | {met} |")
    return "\n".join(lines) + "\n"


def write_docs(results_path: Path, paths: list[Path]) -> list[Path]:
    """Rewrite every marked block of ``paths`` from the results at ``results_path``; returns the files
    that changed. Every block is rendered before any file is written: a bad one changes nothing."""
    if not results_path.is_file():
        raise ValueError(f"{results_path} does not exist; expected the results of a run: python -m bench writes them")
    results = json.loads(results_path.read_text())
    texts = {}
    for path in paths:
        old = path.read_text()

        def table(match, path=path):
            sections = [s.strip() for s in match["sections"].split(",")]
            try:
                return match[1] + render(results, sections) + match[3]
            except ValueError as exc:
                raise ValueError(f"{path.name}: {exc}") from None

        new = BLOCK.sub(table, old)
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
