"""``python -m bench --write-docs``: the docs' marked tables written from one run's results file."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import docs_tables, table

ROOT = Path(__file__).resolve().parents[1]
ROWS = [
    ("machine", "CPU class", "-", "amx-bf16 (2 cores)", "-", "", None),
    ("size", "bytes on disk, compact profile", "5,192 MB (seed file)", "697 MB", "7.45x smaller", ">= 4.5x", True),
    ("writer", "hot tier, 1 thread", "16.1 rows/s (blosc lz4)", "25.3 rows/s", "1.57x", "", None),
    ("size", "bytes on disk, portable profile", "5,192 MB (seed file)", "1,652 MB", "3.14x smaller", "", None),
    ("recording", "close after the last step", "3 s (target)", "4.2 s", "140%", "<= 3 s", False),
]
DOC = """# A page

Text before, with a figure quoted elsewhere: 2.09x.

<!-- bench: size, recording -->
an old table
<!-- /bench -->

Text between.

<!-- bench: writer -->
<!-- /bench -->
Text after.
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
    first = text.split("<!-- bench: size, recording -->\n")[1].split("<!-- /bench -->")[0]
    lines = first.splitlines()
    assert lines[0].startswith("`python -m bench` (20") and "CPU amx-bf16 (2 cores)" in lines[0]
    assert lines[4:] == [  # the rows of both sections in the run's order, each cell as measured
        "| bytes on disk, compact profile | 5,192 MB (seed file) | 697 MB | 7.45x smaller | >= 4.5x | yes |",
        "| bytes on disk, portable profile | 5,192 MB (seed file) | 1,652 MB | 3.14x smaller |  |  |",
        "| close after the last step | 3 s (target) | 4.2 s | 140% | <= 3 s | **no** |",
    ]
    second = text.split("<!-- bench: writer -->\n")[1].split("<!-- /bench -->")[0]
    assert second.splitlines()[-1] == "| hot tier, 1 thread | 16.1 rows/s (blosc lz4) | 25.3 rows/s | 1.57x |  |  |"
    outside = [part.split("<!-- /bench -->")[-1] for part in text.split("<!-- bench:")]
    assert outside == [part.split("<!-- /bench -->")[-1] for part in DOC.split("<!-- bench:")]
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
