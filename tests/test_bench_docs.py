"""``python -m bench --write-docs``: the docs' marked tables written from one run's results file."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import __main__ as bench_main
from bench import docs_tables, table

ROOT = Path(__file__).resolve().parents[1]
ROWS = [
    ("machine", "CPU class", "-", "amx-bf16 (2 cores)", "-", "", None),
    ("size", "bytes on disk, compact profile", "5,192 MB (seed file)", "697 MB", "7.45x smaller", ">= 4.5x", True),
    ("writer", "hot tier, 1 thread", "16.1 rows/s (blosc lz4)", "25.3 rows/s", "1.57x", "", None),
    ("size", "bytes on disk, portable profile", "5,192 MB (seed file)", "1,652 MB", "3.14x smaller", "", None),
    ("recording", "close after the last step", "3 s (target)", "4.2 s", "140%", "<= 3 s", False),
    ("read, warm page cache", "one step", "1.3 ms (file)", "212.6 ms", "162.08x the file's time", "<= 250 ms", True),
]
DOC = """# A page

Text before, with a figure quoted elsewhere: 2.09x.

<!-- bench: size; recording -->
an old table
<!-- /bench -->

Text between.

<!-- bench: writer; read, warm page cache -->
<!-- /bench -->
Text after, and a block shown as code, not rewritten:

```text
<!-- bench: size -->
<!-- /bench -->
```
"""


@pytest.fixture
def results(tmp_path, monkeypatch):
    """A results file written by the bench's own table module, from the rows above."""
    monkeypatch.setattr(table, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(table, "ROWS", [])
    for r in ROWS:
        table.row(*r)
    return table.write_results("latest").with_suffix(".json")


def test_the_results_file_holds_every_row_as_measured(results):
    document = json.loads(results.read_text())
    assert [tuple(r[f] for f in table.FIELDS) for r in document["rows"]] == ROWS
    assert document["written"][:2] == "20" and document["header"] == ""


def test_marked_blocks_get_their_sections_rows_and_nothing_else_changes(results, tmp_path):
    doc = tmp_path / "page.md"
    doc.write_text(DOC)
    assert docs_tables.write_docs(results, [doc]) == [doc]
    text = doc.read_text()
    first = text.split("<!-- bench: size; recording -->\n")[1].split("<!-- /bench -->")[0]
    lines = first.splitlines()
    assert lines[0].startswith("`python -m bench` (20") and "CPU amx-bf16 (2 cores)" in lines[0]
    assert lines[4:] == [  # the rows of both sections in the run's order, each cell as measured
        "| size | bytes on disk, compact profile | 5,192 MB (seed file) | 697 MB | 7.45x smaller | >= 4.5x | yes |",
        "| size | bytes on disk, portable profile | 5,192 MB (seed file) | 1,652 MB | 3.14x smaller |  |  |",
        "| recording | close after the last step | 3 s (target) | 4.2 s | 140% | <= 3 s | **no** |",
    ]
    second = text.split("<!-- bench: writer; read, warm page cache -->\n")[1].split("<!-- /bench -->")[0]
    assert second.splitlines()[-2:] == [  # a section's name may hold commas: sections are split at semicolons
        "| writer | hot tier, 1 thread | 16.1 rows/s (blosc lz4) | 25.3 rows/s | 1.57x |  |  |",
        "| read, warm page cache | one step | 1.3 ms (file) | 212.6 ms | 162.08x the file's time | <= 250 ms | yes |",
    ]
    outside = [part.split("<!-- /bench -->")[-1] for part in text.split("<!-- bench:")]
    assert outside == [part.split("<!-- /bench -->")[-1] for part in DOC.split("<!-- bench:")]
    assert text.endswith("```text\n<!-- bench: size -->\n<!-- /bench -->\n```\n")  # code: not a block
    assert docs_tables.write_docs(results, [doc]) == [] and doc.read_text() == text  # written once: current


def test_a_section_the_run_lacks_is_refused_and_no_file_is_written(results, tmp_path):
    good, bad = tmp_path / "good.md", tmp_path / "bad.md"
    good.write_text(DOC)
    bad.write_text("<!-- bench: gpu reads -->\n<!-- /bench -->\n")
    with pytest.raises(ValueError, match=r"bad.md: sections \['gpu reads'\] are not in the results"):
        docs_tables.write_docs(results, [good, bad])
    assert good.read_text() == DOC


def test_the_command_says_what_is_missing_in_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--write-docs", str(tmp_path / "none.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (
        f"python -m bench --write-docs: error: {tmp_path / 'none.json'} does not exist; "
        "expected the results of a run: python -m bench writes them"
    )


def test_a_figure_is_a_number_with_a_unit_a_ratio_or_a_percent_outside_code_bounds_and_markers():
    doc = """A read takes 1,580.4 ms, 7.25x smaller, +26.3% slower, 0.54 steps/s, 2 min 18 s.
Not figures: 200 steps, 16 threads, a 50,257 x 64 shape, float32, x86-64, `--cache 64MiB`, <= 3 s, >= 1.8x.

```bash
python -m bench  # 8 minutes
```

<!-- bench: size -->
| compact | 717 MB |
<!-- /bench -->
<!-- quoted: measured 2026-11-26, 2-core amx-bf16, python -m bench -->
The notebook's file: 5,193 MB; inline <!-- /quoted --> and after it 9.9 s.
<!-- quoted:  -->says nothing of where 3 GB comes from<!-- /quoted -->
Shown in code, `<!-- quoted: x -->` marks nothing: 4 GB.<!-- /quoted -->
"""
    assert docs_tables.uncovered(doc) == [
        (1, "1,580.4 ms"),
        (1, "7.25x"),
        (1, "26.3%"),
        (1, "0.54 steps/s"),
        (1, "2 min"),
        (1, "18 s"),
        (12, "9.9 s"),
        (13, "3 GB"),
        (14, "4 GB"),
    ]


def test_every_figure_in_the_docs_is_the_bench_s_or_quoted():
    found = [
        f"{p.name}:{line}: {figure}"
        for p in docs_tables.documents()
        for line, figure in docs_tables.uncovered(p.read_text())
    ]
    assert found == [], "figures neither in a bench block nor quoted (docs/targets.md, 'Where the figures come from')"


def test_a_block_is_stale_until_written_from_the_results(results, tmp_path):
    doc = tmp_path / "page.md"
    doc.write_text(DOC)
    document = json.loads(results.read_text())
    assert docs_tables.stale(document, [doc]) == ["page.md: size; recording", "page.md: writer; read, warm page cache"]
    docs_tables.write_docs(results, [doc])
    assert docs_tables.stale(document, [doc]) == []
    doc.write_text(doc.read_text().replace("697 MB", "698 MB"))
    assert docs_tables.stale(document, [doc]) == ["page.md: size; recording"]


def test_the_docs_bench_blocks_hold_the_committed_full_run():
    """Until a full run's results are committed (bench/results/latest.json), the blocks are not checked."""
    if not docs_tables.LATEST.is_file():
        pytest.skip(
            f"{docs_tables.LATEST.relative_to(ROOT)} is not committed yet: no full run to check the blocks against"
        )
    documents = docs_tables.documents()
    assert any("<!-- bench: " in p.read_text() for p in documents if p.name == "targets.md")
    results = json.loads(docs_tables.LATEST.read_text())
    sections = {r["section"] for r in results["rows"]}
    assert {"recording", "numerics", "main job"} <= sections and "quick" not in results["header"], "not a full run"
    assert docs_tables.stale(results, documents) == [], "run python -m bench --write-docs"


def test_only_a_full_run_writes_the_committed_results():
    names = {(q, s): bench_main.results_name(q, s) for q in (False, True) for s in (False, True)}
    assert names == {(False, False): "latest", (False, True): "partial", (True, False): "quick", (True, True): "quick"}
    ignored = [
        subprocess.run(["git", "check-ignore", "-q", f"bench/results/{name}.{suffix}"], cwd=ROOT).returncode
        for name in ("latest", "partial", "quick", "gpu", "scale")
        for suffix in ("json", "md")
    ]
    assert ignored == [1] + [0] * 9  # git keeps latest.json alone (check-ignore: 0 ignored, 1 not)
