"""Stores of older formats read bit for bit as before. Format 2 (tests/data/format2, written by the
last wordystore to write format 2): verify says they predate binding, a writer refuses to append to
them, a repair keeps them format 2, and ``convert`` upgrades them to the current format with their
newest resume state. Format 3 (tests/data/format3): verify says it predates the binding of decoding
parameters, and ``convert`` upgrades it."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

import wordystore
from wordystore.format.keys import FORMAT_VERSION
from wordystore.tools.convert import convert

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(DATA))
import make_format2 as v2  # noqa: E402 - the data's own description of what it holds

STORES = ["compact", "portable", "hot"]


def copy(name: str, tmp_path) -> Path:
    path = tmp_path / f"{name}.zarr"
    shutil.copytree(DATA / "format2" / f"{name}.zarr", path)
    return path


def assert_holds_the_rows(path) -> wordystore.Trajectory:
    t = wordystore.open(path)
    reference = v2.rows(v2.STEPS)
    assert t.steps.tolist() == v2.STEPS
    for name in v2.KINDS:
        assert t[name].numpy().tobytes() == reference[name].tobytes(), name
    assert {name: ids.tolist() for name, ids in t.token_sets.items()} == v2.TOKEN_SETS
    tensors, info, step = wordystore.load_state(path)
    assert (
        step == v2.STEPS[-1]
        and info == v2.state(step)[1]
        and torch.equal(tensors["weights"], v2.state(step)[0]["weights"])
    )
    return t


@pytest.mark.parametrize("name", STORES)
def test_a_format_2_store_reads_bit_for_bit(name):
    t = assert_holds_the_rows(DATA / "format2" / f"{name}.zarr")  # read in place: reading writes nothing
    assert t.metadata["format_version"] == 2 and t.commit_record.format_version == 2
    assert (t.commit_record.compacted_rows, len(t)) == ((8, 13) if name == "hot" else (13, 13))


@pytest.mark.parametrize("name", STORES)
def test_verify_says_a_format_2_store_predates_binding(name, tmp_path):
    report = wordystore.verify(copy(name, tmp_path))
    assert report.ok and report.exit_status == 0 and report.verified_rows == 13
    assert (
        "format 2: this store predates chunks bound to their place and resume states with checksums" in report.summary()
        and "`wordystore convert" in report.summary()
    )


def test_a_writer_refuses_a_format_2_store_and_changes_nothing(tmp_path):
    path = copy("hot", tmp_path)
    before = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    with pytest.raises(
        wordystore.FormatError,
        match=r"is a format-2 trajectory, which this wordystore reads but does "
        r"not append to; `wordystore convert .* NEW\.zarr`",
    ):
        wordystore.resume(path)
    assert {p: p.read_bytes() for p in path.rglob("*") if p.is_file() and p.name != ".wordystore-writer.lock"} == before


def test_a_repair_keeps_a_format_2_store_format_2(tmp_path):
    path = copy("compact", tmp_path)
    (path / "commit.json").unlink()
    report = wordystore.verify(path, repair=True)
    assert report.ok and report.verified_rows == 13
    record = json.loads((path / "commit.json").read_text())
    assert record["format_version"] == 2 and record["states"] == [
        {"row": 12, "step": 37, "key": "state/000000000012.safetensors"}
    ]
    assert_holds_the_rows(path)


@pytest.mark.parametrize("name", STORES)
def test_convert_upgrades_a_format_2_store_with_its_resume_state(name, tmp_path):
    t = convert(DATA / "format2" / f"{name}.zarr", tmp_path / "new.zarr", progress=False)
    assert t.metadata["format_version"] == FORMAT_VERSION and t.commit_record.format_version == FORMAT_VERSION
    assert_holds_the_rows(tmp_path / "new.zarr")
    report = wordystore.verify(tmp_path / "new.zarr")
    assert report.ok and "predates" not in report.summary()
    with wordystore.resume(tmp_path / "new.zarr") as w:  # the run goes on in the current format
        w.append(v2.STEPS[-1] + 3, **v2.row(v2.STEPS[-1] + 3))
    assert len(wordystore.open(tmp_path / "new.zarr")) == 14


# -- format 3 (tests/data/format3, written by the last wordystore to write format 3) -----------------------


def test_a_format_3_store_reads_bit_for_bit_and_verify_says_it_predates_binding_decoding(tmp_path):
    path = tmp_path / "f3.zarr"
    shutil.copytree(DATA / "format3" / "compact.zarr", path)
    t = assert_holds_the_rows(path)
    assert t.metadata["format_version"] == 3 and t.commit_record.format_version == 3
    report = wordystore.verify(path)
    assert report.ok and report.exit_status == 0 and report.verified_rows == 13
    assert "format 3: this store predates the binding of decoding parameters to its shards" in report.summary()
    with pytest.raises(wordystore.FormatError, match=r"is a format-3 trajectory, which this wordystore reads"):
        wordystore.resume(path)


def test_convert_upgrades_a_format_3_store_whose_decoding_parameters_are_then_bound(tmp_path):
    t = convert(DATA / "format3" / "compact.zarr", tmp_path / "new.zarr", progress=False)
    assert t.metadata["format_version"] == FORMAT_VERSION and t.commit_record.format_version == FORMAT_VERSION
    assert_holds_the_rows(tmp_path / "new.zarr")
    assert wordystore.verify(tmp_path / "new.zarr").ok
    for key, field in (("zarr.json", ("predictions", "momentum")), ("momentum.residuals/zarr.json", ("prediction",))):
        doc = json.loads((tmp_path / "new.zarr" / key).read_text())
        prediction = doc["attributes"]["wordystore"]
        for name in field:
            prediction = prediction[name]
        prediction["beta"] = 0.8  # the same forgery in both documents
        (tmp_path / "new.zarr" / key).write_text(json.dumps(doc))
    with pytest.raises(wordystore.CorruptChunkError, match="binds other decoding parameters"):
        wordystore.open(tmp_path / "new.zarr").momentum.numpy()
