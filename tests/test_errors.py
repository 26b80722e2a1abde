"""Bad input gets a clear error, and nothing committed is lost by it."""

import ml_dtypes
import numpy as np
import pytest
import torch
import zarr

import wordystore
from wordystore import Kind, trajectory

KINDS = {"emb": Kind((6, 2), "bfloat16", ("token", "dim")), "loss": Kind((), "float32", ())}


def good(step):
    return {"emb": torch.full((6, 2), float(step)).bfloat16(), "loss": float(step)}


@pytest.fixture
def writer(tmp_path):
    w = wordystore.create(tmp_path / "t.zarr", KINDS, block_rows=2, chunk_rows=4)
    w.append(0, **good(0))
    w.append(1, **good(1))
    w.flush()
    yield w
    w.close()


@pytest.mark.parametrize(
    "step, tensors, message",
    [
        (
            2,
            {**good(2), "emb": torch.zeros(6, 3).bfloat16()},
            r"kind 'emb' expects shape \(6, 2\) and dtype bfloat16; got shape \(6, 3\)",
        ),
        (2, {**good(2), "emb": torch.zeros(6, 2)}, "dtype bfloat16; got shape .* and dtype torch.float32"),
        (2, {**good(2), "emb": np.zeros((6, 2), np.float16)}, "dtype float16"),
        (2, {**good(2), "extra": torch.zeros(1)}, r"unknown kind\(s\) \['extra'\]"),
        (2, {"emb": good(2)["emb"]}, r"missing kind\(s\) \['loss'\]"),
        (1, good(1), "steps must increase; the last step appended is 1"),
        (-1, good(1), "steps must increase"),
        ("3", good(3), "step must be an int"),
        (2, {**good(2), "loss": "x"}, "takes a torch tensor or numpy array"),
    ],
)
def test_bad_appends_are_refused_and_leave_the_store_intact(writer, tmp_path, step, tensors, message):
    with pytest.raises(wordystore.AppendError, match=message):
        writer.append(step, **tensors)
    writer.append(2, **good(2))  # the writer goes on
    writer.flush()
    t = trajectory.open(tmp_path / "t.zarr")
    assert len(t) == 3 and t.loss[:].tolist() == [0.0, 1.0, 2.0]


def test_a_second_writer_is_refused(writer, tmp_path):
    with pytest.raises(wordystore.StoreLockedError, match="another writer"):
        wordystore.resume(tmp_path / "t.zarr")
    with pytest.raises(wordystore.StoreLockedError):
        wordystore.create(tmp_path / "t.zarr", KINDS, overwrite=True)
    assert len(trajectory.open(tmp_path / "t.zarr")) == 2


def test_writes_to_read_only_stores_are_refused(writer, tmp_path):
    writer.close()
    store = zarr.storage.LocalStore(tmp_path / "t.zarr", read_only=True)
    with pytest.raises(wordystore.ReadOnlyError, match="read-only"):
        wordystore.resume(store)
    with pytest.raises(wordystore.ReadOnlyError):
        trajectory.open(tmp_path / "t.zarr").emb[0] = torch.zeros(6, 2).bfloat16()


def test_create_refuses_an_existing_store_and_bad_declarations(writer, tmp_path):
    writer.close()
    before = sorted((p, p.stat().st_size) for p in (tmp_path / "t.zarr").rglob("*"))
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        wordystore.create(tmp_path / "t.zarr", KINDS)
    assert sorted((p, p.stat().st_size) for p in (tmp_path / "t.zarr").rglob("*")) == before  # untouched
    assert trajectory.open(tmp_path / "t.zarr").loss[:].tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="kind dtype 'complex32' is not supported"):
        Kind((2,), "complex32")
    with pytest.raises(ValueError, match="kind name 'recorded_steps' is not allowed"):
        wordystore.create(tmp_path / "u.zarr", {"recorded_steps": Kind((1,), "float32")})
    with pytest.raises(ValueError, match="JSON-serialisable"):
        wordystore.create(tmp_path / "v.zarr", KINDS, config={"f": object()})
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 6\)"):
        wordystore.create(tmp_path / "w.zarr", KINDS, token_sets={"bad": [0, 6]})


def test_opening_something_else_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trajectory at"):
        trajectory.open(tmp_path / "missing.zarr")
    zarr.open_group(tmp_path / "plain.zarr", mode="w")
    with pytest.raises(wordystore.FormatError, match="not a wordystore trajectory"):
        trajectory.open(tmp_path / "plain.zarr")


def test_a_corrupt_chunk_names_the_array_and_the_chunk(writer, tmp_path):
    writer.close()
    shard = tmp_path / "t.zarr" / "emb" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[5] ^= 0xFF  # inside the first inner chunk's compressed bytes
    shard.write_bytes(bytes(data))
    t = trajectory.open(tmp_path / "t.zarr")
    with pytest.raises(
        wordystore.CorruptChunkError, match=r"array 'emb' chunk \(0, 0, 0\) \(step 0\.\.3, token 0\.\.5"
    ):
        t.emb[:, 0]
    assert t.loss[:].tolist() == [0.0, 1.0]  # other arrays still read


def test_a_background_failure_surfaces_in_the_caller(tmp_path):
    w = wordystore.create(tmp_path / "t.zarr", KINDS, block_rows=1, chunk_rows=2, writer_process=False)
    w._background._hot["emb"] = None  # sabotage the background write of the next block (in this process)
    w.append(0, **good(0))
    with pytest.raises(wordystore.WriterFailedError, match="background writer"):
        w.flush()
    with pytest.raises(wordystore.WriterFailedError):
        w.append(1, **good(1))
    with pytest.raises(wordystore.WriterFailedError):
        w.close()
    assert len(trajectory.open(tmp_path / "t.zarr")) == 0


def test_create_with_overwrite_replaces_the_store(writer, tmp_path):
    writer.close()
    path = tmp_path / "t.zarr"
    new = {"other": Kind((3,), "int32", ("token",))}
    with wordystore.create(path, new, overwrite=True) as w:
        w.append(7, other=np.arange(3, dtype=np.int32))
    t = trajectory.open(path)
    assert t.kinds == new and t.steps.tolist() == [7] and t.other[0].tolist() == [0, 1, 2]
    assert not any(p.is_file() for p in (path / "emb").rglob("*"))  # the old kind's files are gone


def test_append_refuses_steps_past_int64(writer):
    with pytest.raises(
        wordystore.AppendError, match=r"append\(step=9223372036854775808\): steps must lie in \[0, 2\*\*63\)"
    ):
        writer.append(2**63, **good(2))
    writer.append(2**63 - 1, **good(2))  # the largest step an int64 holds
    writer.flush()


def test_scalar_kinds_refuse_values_they_cannot_hold_and_take_numpy_scalars(tmp_path):
    kinds = {"f32": Kind((), "float32"), "bf16": Kind((), "bfloat16"), "i8": Kind((), "int8")}
    with wordystore.create(tmp_path / "s.zarr", kinds) as w:
        for value, kind, message in [
            (1e39, "f32", "1e\\+39 overflows float32"),
            (-1e39, "bf16", "-1e\\+39 overflows bfloat16"),
            (300, "i8", "300 does not fit in int8"),
            (1.5, "i8", "1.5 does not fit in int8"),
            (True, "f32", "a float32 kind takes numbers, not bools"),
        ]:
            row = {"f32": 0.0, "bf16": 0.0, "i8": 0, kind: value}
            with pytest.raises(wordystore.AppendError, match=rf"append\(step=0\): kind '{kind}': {message}"):
                w.append(0, **row)
        w.append(0, f32=np.float32(0.25), bf16=ml_dtypes.bfloat16(1.5), i8=np.int64(-3))
        w.append(1, f32=float("inf"), bf16=float("nan"), i8=2.0)  # infinity and NaN as given: no overflow
    t = trajectory.open(tmp_path / "s.zarr")
    assert t.f32[:].tolist() == [0.25, float("inf")] and t.i8[:].tolist() == [-3, 2]
    assert t.bf16[0].item() == 1.5 and np.isnan(t.bf16[1].item())


def test_resume_of_a_missing_store_creates_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no trajectory at {tmp_path / 'missing.zarr'} to resume"):
        wordystore.resume(tmp_path / "missing.zarr")
    assert not (tmp_path / "missing.zarr").exists()
