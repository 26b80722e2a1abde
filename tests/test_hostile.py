"""The hostile-store suite: a store from someone else, damaged or made to harm, opened
as a user would (``info``, ``verify``, ``export``, reading, ``load_state``, ``resume``).

Every case mutates a copy of a real store (written by the real writer) that lies in a small world
directory beside files a hostile store might reach for (``outside/``: a victim file, a token set,
another store's resume state). Each command ends in a clear error, or the right values, within a
bounded time (an alarm, far above what it takes), and the ``world`` fixture asserts afterwards that
nothing outside the store changed: every path, its type, size, mtime and content.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

import wordystore
from wordystore import CorruptChunkError, FormatError, Kind
from wordystore.analysis import measures
from wordystore.cli import main
from wordystore.format.codecs import BindingRecord, Crc32c, ShardIndex
from wordystore.format.metadata import Metadata
from wordystore.tools.token_sets import token_sets_from_mask_file

VOCAB, DIM, STEPS = 12, 2, 14
KINDS = {**wordystore.seed_kinds(VOCAB, DIM), "wide": Kind((8, 4096), "bfloat16", ("slot", "dim"))}  # 2 chunks a shard
SCALARS = {
    "init_scale": 0.02,
    "learning_rate": 1e-3,
    "weight_decay": 0.0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "n_trained": 6,
    "n_untrained": 6,
}
SETS = {"trained": list(range(0, VOCAB, 2)), "untrained": list(range(1, VOCAB, 2))}
BOUND = 60  # seconds: a generous bound on any command here (each takes well under one)


def row(step: int) -> dict:
    rng = np.random.default_rng(step)
    data = {
        name: rng.standard_normal(kind.shape).astype(np.float32).astype(kind.numpy_dtype)
        for name, kind in KINDS.items()
    }
    data["grad_norm"] = np.float32(1.0 + step)
    return data


def state(step: int):
    return {"weights": torch.full((4,), float(step))}, {"after_step": step}


def build(path) -> None:
    w = wordystore.create(
        path,
        KINDS,
        token_sets=SETS,
        config={"seed_scalars": SCALARS},
        block_rows=2,
        chunk_rows=4,
        predictions=wordystore.adam_predictions(0.9, 0.999, 1.0),
    )
    w.set_state_provider(lambda: state(w.last_step))
    for step in range(STEPS):
        w.append(step, **row(step))
    w.close()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """The store every case copies, and another store of the same kinds (another store id)."""
    root = tmp_path_factory.mktemp("pristine")
    build(root / "store.zarr")
    build(root / "other.zarr")
    return root


def snapshot(root: Path, store: Path) -> dict:
    """Every path under ``root`` but the store: its type, size, mtime and content (files)."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder) / name
            if path == store or store in path.parents:
                continue
            info = os.lstat(path)
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(info.st_mode) else None
            seen[str(path)] = (stat.S_IFMT(info.st_mode), info.st_size, info.st_mtime_ns, digest)
    return seen


@dataclass
class World:
    root: Path
    store: Path
    outside: Path
    other: Path  # another store, outside this one


@pytest.fixture
def world(pristine, tmp_path):
    root = tmp_path / "world"
    store, outside = root / "store.zarr", root / "outside"
    shutil.copytree(pristine / "store.zarr", store)
    shutil.copytree(pristine / "other.zarr", root / "other.zarr")
    outside.mkdir()
    (outside / "victim.txt").write_text("a file the store must never touch\n")
    shutil.copytree(store / "token_sets" / "trained", outside / "evil_set")
    shutil.copy(store / "state" / f"{STEPS - 1:012d}.safetensors", outside / "outside.safetensors")
    shutil.copytree(store / "embeddings/c/1", outside / "rows")  # where a linked directory could lead
    shutil.copytree(store / "hot/losses", outside / "losses")
    before = snapshot(root, store)
    yield World(root, store, outside, root / "other.zarr")
    assert snapshot(root, store) == before, "something outside the store changed"


@contextlib.contextmanager
def bounded(seconds: int = BOUND):
    """Fail (rather than hang) if the block takes longer than ``seconds``."""

    def expire(signum, frame):
        raise TimeoutError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def cli(capsys, *args) -> tuple[int, str, str]:
    with bounded():
        status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def refused(capsys, command: str, store: Path, message: str) -> None:
    """``wordystore COMMAND STORE`` exits 2 with one line naming what is wrong."""
    status, _, err = cli(capsys, command, store)
    assert status == 2 and err.count("\n") == 1 and re.search(message, err), err


def verify_lists(capsys, store: Path, message: str) -> str:
    """``wordystore verify --quiet STORE`` exits 1, listing a problem that matches ``message``."""
    status, out, _ = cli(capsys, "verify", "--quiet", store)
    assert status == 1 and re.search(message, out), out
    return out


def read_everything(store: Path) -> None:
    with bounded():
        t = wordystore.open(store)
        for name in t.kinds:
            t[name].numpy()
        t.token_sets
        wordystore.load_state(store)


def edit(path: Path, change) -> None:
    doc = json.loads(path.read_bytes())
    change(doc)
    path.write_text(json.dumps(doc))


def meta_of(doc: dict) -> dict:
    return doc["attributes"]["wordystore"]


# -- names and keys that lead outside the store -----------------------------------------------------------


def test_a_resume_state_key_outside_the_store_deletes_nothing(world, capsys):
    edit(world.store / "commit.json", lambda d: d["states"][0].update(key="../outside/victim.txt"))
    message = r"states\[0\] has key '\.\./outside/victim\.txt'; the state of row 13 is 'state/000000000013"
    refused(capsys, "info", world.store, message)
    with pytest.raises(FormatError, match=message):
        wordystore.resume(world.store)
    with pytest.raises(FormatError, match=message):
        wordystore.load_state(world.store)
    verify_lists(capsys, world.store, message)
    assert cli(capsys, "verify", "--quiet", "--repair", world.store)[0] == 0  # the record rebuilt from the store
    with wordystore.resume(world.store) as w:  # and the run goes on: 8 appends, old states deleted
        w.set_state_provider(lambda: state(w.last_step))
        for step in range(STEPS, STEPS + 8):
            w.append(step, **row(step))
    assert wordystore.load_state(world.store)[2] == STEPS + 7


@pytest.mark.parametrize(
    "key", ["../outside/outside.safetensors", "OUTSIDE", "state/../../outside/outside.safetensors"]
)
def test_a_resume_state_outside_the_store_is_not_loaded(world, capsys, key):
    key = str(world.outside / "outside.safetensors") if key == "OUTSIDE" else key
    edit(world.store / "commit.json", lambda d: d["states"][0].update(key=key))
    with pytest.raises(FormatError, match=r"states\[0\] has key"):
        wordystore.load_state(world.store)
    refused(capsys, "info", world.store, r"commit\.json is damaged: states\[0\] has key")


def test_a_resume_state_linked_outside_the_store_is_not_loaded(world, capsys):
    state_file = world.store / "state" / f"{STEPS - 1:012d}.safetensors"
    state_file.unlink()
    state_file.symlink_to(world.outside / "outside.safetensors")
    with pytest.raises(FormatError, match="is a symbolic link"):
        wordystore.load_state(world.store)
    verify_lists(
        capsys, world.store, r"resume state 'state/000000000013\.safetensors': it cannot be read .*symbolic link"
    )


def test_a_kind_named_outside_the_store_is_refused_and_nothing_is_written_outside(world, capsys):
    edit(
        world.store / "zarr.json",
        lambda d: meta_of(d)["kinds"].update({"../outside_kind": meta_of(d)["kinds"]["losses"]}),
    )
    message = r"metadata document is damaged: kinds: kind name '\.\./outside_kind' is not allowed"
    refused(capsys, "info", world.store, message)
    with pytest.raises(FormatError, match=message):
        wordystore.resume(world.store)
    verify_lists(capsys, world.store, message)


def test_a_token_set_named_outside_the_store_is_refused(world, capsys):
    edit(world.store / "zarr.json", lambda d: meta_of(d)["token_sets"].append("../../outside/evil_set"))
    message = r"token_sets: token set name '\.\./\.\./outside/evil_set' is not allowed"
    refused(capsys, "info", world.store, message)
    status, _, err = cli(capsys, "export", world.store, world.root.parent / "x.safetensors", "--tokens", "trained")
    assert status == 2 and re.search(message, err), err
    verify_lists(capsys, world.store, message)


def test_a_symbolic_link_for_the_writer_lock_is_refused_and_its_target_untouched(world, capsys):
    (world.store / ".wordystore-writer.lock").unlink(missing_ok=True)
    (world.store / ".wordystore-writer.lock").symlink_to(world.outside / "victim.txt")
    refused(capsys, "verify", world.store, r"\.wordystore-writer\.lock is a symbolic link")
    with pytest.raises(FormatError, match="is a symbolic link"):
        wordystore.resume(world.store)


# -- shards out of place --------------------------------------------------------------------------------


COPIES = {  # the case -> (shard copied, shard it replaces, (kind, rows) that read it)
    "rows 0-3 over rows 4-7": ("embeddings/c/0/0/0", "embeddings/c/1/0/0", ("embeddings", slice(4, 8))),
    "grads over embeddings": ("grads/c/1/0/0", "embeddings/c/1/0/0", ("embeddings", slice(4, 8))),
    "learning_rate over grad_norm": ("learning_rate/c/1", "grad_norm/c/1", ("grad_norm", slice(4, 8))),
    "grad_norm_clipped over grad_norm": ("grad_norm_clipped/c/2", "grad_norm/c/2", ("grad_norm", slice(8, 12))),
    "variance's residuals over momentum's": (
        "variance.residuals/c/0/0/0",
        "momentum.residuals/c/0/0/0",
        ("momentum", slice(0, 4)),
    ),
    "a token set over another": ("token_sets/trained/c/0", "token_sets/untrained/c/0", None),
}


@pytest.mark.parametrize("case", COPIES)
def test_a_shard_copied_over_another_is_detected_on_read_and_by_verify(world, capsys, case):
    source, target, read = COPIES[case]
    shutil.copy(world.store / source, world.store / target)
    with (
        bounded(),
        pytest.raises(CorruptChunkError, match=rf"'{re.escape(target)}'.*binding record names another place"),
    ):
        t = wordystore.open(world.store)
        t[read[0]].numpy(read[1]) if read else t.token_set("untrained")
    origin = rf".*\(they are the bytes of '{re.escape(source)}'\)" if read else ""  # named for per-row arrays
    verify_lists(
        capsys, world.store, rf"corrupt shard: '{re.escape(target)}' .*binding record names another place{origin}"
    )


def test_a_shard_of_another_store_is_detected(world, capsys):
    shutil.copy(world.other / "embeddings/c/1/0/0", world.store / "embeddings/c/1/0/0")
    with pytest.raises(CorruptChunkError, match="binding record names another place"):
        wordystore.open(world.store).embeddings.numpy(slice(4, 8))
    verify_lists(capsys, world.store, r"'embeddings/c/1/0/0'.*\(of no shard of this store: another store's\?\)")
    report = wordystore.verify(world.store, repair=True)  # the rows before it are kept
    assert report.verified_rows == 4 and len(wordystore.open(world.store)) == 4


def test_a_store_whose_id_was_edited_binds_none_of_its_shards(world, capsys):
    edit(world.store / "zarr.json", lambda d: meta_of(d).update(store_id="0" * 32))
    with pytest.raises(CorruptChunkError, match="binding record names another place"):
        wordystore.open(world.store)  # its steps are read at once
    verify_lists(capsys, world.store, "of no shard of this store")


def swap_chunks(file: Path, copy: bool = False) -> None:
    """Swap the index entries of a shard's two inner chunks (or point both at the first), with a valid crc."""
    data = file.read_bytes()
    index = ShardIndex.decode(data[-ShardIndex.nbytes(2) :], 2).table.copy()
    index[[0, 1]] = index[[0, 0]] if copy else index[[1, 0]]
    file.write_bytes(data[: -ShardIndex.nbytes(2)] + Crc32c().encode(index.astype("<u8").tobytes()))


@pytest.mark.parametrize("copy", [False, True], ids=["swapped", "one copied over the other"])
def test_chunks_moved_inside_a_shard_are_detected(world, capsys, copy):
    swap_chunks(world.store / "wide/c/1/0/0", copy)
    with pytest.raises(
        CorruptChunkError,
        match=r"misplaced chunk: array 'wide' chunk \(1, [01], 0\).*inner chunk [01] "
        r"is not the chunk bound to that place",
    ):
        wordystore.open(world.store).wide.numpy(slice(4, 8))
    verify_lists(capsys, world.store, r"misplaced chunk: array 'wide'")


@pytest.mark.parametrize("damage", ["none", "huge chunk", "far offset", "swapped", "linked"])
def test_a_read_of_few_chunks_of_a_shard_checks_what_it_reads(tmp_path, damage):
    """A read needing under half of a shard's chunks fetches its tail, then only those chunks (one
    open of the file): the same checks hold there as on a whole shard."""
    kind = Kind((64, 2048), "bfloat16", ("token", "dim"))  # 8 inner chunks a shard along the tokens
    values = np.random.default_rng(0).standard_normal((4, *kind.shape)).astype(np.float32).astype(kind.numpy_dtype)
    with wordystore.create(tmp_path / "s.zarr", {"x": kind}, block_rows=2, chunk_rows=4) as w:
        for step in range(4):
            w.append(step, x=values[step])
    shard = tmp_path / "s.zarr/x/c/0/0/0"
    assert wordystore.open(tmp_path / "s.zarr").layouts["x"][0].chunks_per_shard == (1, 8, 1)
    data, n = shard.read_bytes(), ShardIndex.nbytes(8)
    index = ShardIndex.decode(data[-n:], 8).table.copy()
    if damage == "huge chunk":
        index[3, 1] = 1 << 40
    elif damage == "far offset":
        index[3, 0] = 2**64 - 2  # past any file (and any offset the OS takes)
    elif damage == "swapped":
        index[[2, 3]] = index[[3, 2]]
    shard.write_bytes(data[:-n] + Crc32c().encode(index.astype("<u8").tobytes()))
    if damage == "linked":
        os.replace(shard, tmp_path / "elsewhere")
        shard.symlink_to(tmp_path / "elsewhere")
    message = {
        "huge chunk": r"lists 1099511627776 bytes for the chunk, more than such a chunk can take",
        "far offset": r"misplaced chunk: array 'x' chunk \(0, 3, 0\).*inner chunk 3 is not the chunk bound",
        "swapped": r"misplaced chunk: array 'x' chunk \(0, 3, 0\).*inner chunk 3 is not the chunk bound",
        "linked": r"unreadable shard: 'x/c/0/0/0'.*is a symbolic link",
    }.get(damage)
    with bounded():
        t = wordystore.open(tmp_path / "s.zarr")
        if message is None:
            got = t.x.numpy((slice(None), [1, 25, 26]))
            assert np.array_equal(got.view(np.uint16), values[:, [1, 25, 26]].view(np.uint16))
        else:
            with pytest.raises(CorruptChunkError, match=message):
                t.x.numpy((slice(None), 25))


def test_an_older_copy_of_a_shard_is_detected(world, capsys):
    shard = world.store / "embeddings/c/3/0/0"  # rows 12..13 of a chunk of 4
    old = shard.read_bytes()
    with wordystore.resume(world.store) as w:
        for step in range(STEPS, STEPS + 2):  # rows 14..15 complete the chunk, which is rewritten
            w.append(step, **row(step))
    shard.write_bytes(old)
    with pytest.raises(CorruptChunkError, match="it holds 2 written rows but 4 are read from it: an older copy"):
        wordystore.open(world.store).embeddings.numpy(slice(14, 16))
    verify_lists(capsys, world.store, r"'embeddings/c/3/0/0'.*holds 2 written rows but 4 are read")


# -- resume states --------------------------------------------------------------------------------------


def test_a_flipped_byte_in_a_resume_state_is_detected(world, capsys):
    file = world.store / "state" / f"{STEPS - 1:012d}.safetensors"
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x01  # in the tensors' data, past the header
    file.write_bytes(bytes(data))
    with pytest.raises(
        FormatError,
        match=r"resume state state/000000000013\.safetensors is damaged: it is \d+ bytes of "
        r"CRC-32C 0x[0-9a-f]{8}; commit\.json recorded \d+ bytes of CRC-32C",
    ):
        wordystore.load_state(world.store)
    verify_lists(capsys, world.store, r"resume state 'state/000000000013\.safetensors': it is \d+ bytes of CRC-32C")


# -- sizes a document claims ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows, message",
    [
        (10**15, r"committed_rows 1000000000000000 .* must be counts with compacted <= committed <= 1099511627776"),
        (
            10**9,
            r"commit\.json admits 1000000000 rows but the shards of array 'embeddings' hold at most 16 "
            r"\('hot/embeddings/c/8/0/0' is missing\)",
        ),
    ],
)
def test_row_counts_past_what_the_store_holds_are_refused(world, capsys, rows, message):
    edit(world.store / "commit.json", lambda d: d.update(committed_rows=rows, last_step=rows))
    for document in (world.store / "hot").glob("*/zarr.json"):
        edit(document, lambda d: d.update(shape=[rows, *d["shape"][1:]]))
    refused(capsys, "info", world.store, message)
    with pytest.raises(FormatError, match=message):
        wordystore.resume(world.store)
    verify_lists(capsys, world.store, r"commit\.json")


def test_a_kind_declared_too_wide_for_the_format_is_refused(world, capsys):
    edit(world.store / "zarr.json", lambda d: meta_of(d)["kinds"]["logits"].update(shape=[10**12]))
    message = r"kind 'logits' of shape \[1000000000000\] takes 2000000000000 bytes a row; a row of a kind takes at most"
    refused(capsys, "info", world.store, message)
    verify_lists(capsys, world.store, message)


def test_a_kind_declared_wider_than_its_shards_is_refused(world, capsys):
    edit(world.store / "zarr.json", lambda d: meta_of(d)["kinds"]["wide"].update(shape=[80_000, 4096]))
    meta = wordystore.format.metadata.Metadata.from_json(
        meta_of(json.loads((world.store / "zarr.json").read_text())), "x"
    )
    for layout in meta.layouts("wide", STEPS):  # the array's own documents agree with the metadata
        (world.store / layout.path / "zarr.json").write_text(json.dumps(layout.to_zarr_json()))
    message = r"array 'wide' is 80000 long along 'slot' .*: 1250 shards, but its shards present cover 1"
    refused(capsys, "info", world.store, message)
    verify_lists(capsys, world.store, message)


def test_a_document_too_large_or_too_deep_is_refused(world, capsys):
    (world.store / "commit.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(capsys, "info", world.store, r"commit\.json is not valid JSON \(RecursionError")
    (world.store / "commit.json").write_text('{"committed_rows": ' + "9" * 5000 + "}")
    refused(capsys, "info", world.store, r"commit\.json is not valid JSON \(ValueError")
    with open(world.store / "zarr.json", "r+b") as f:
        f.truncate(1 << 30)  # a sparse GiB: refused by its size, never read
    refused(capsys, "info", world.store, r"zarr\.json is 1073741824 bytes; wordystore reads at most 67108864")


def test_a_shard_larger_than_its_chunks_can_be_is_not_read(world, capsys):
    with open(world.store / "embeddings/c/1/0/0", "r+b") as f:
        f.truncate(1 << 32)  # a sparse 4 GiB
    with pytest.raises(
        CorruptChunkError,
        match=r"unreadable shard: 'embeddings/c/1/0/0'.*is 4294967296 bytes; "
        r"wordystore reads at most",
    ):
        wordystore.open(world.store).embeddings.numpy(slice(4, 8))
    verify_lists(capsys, world.store, r"'embeddings/c/1/0/0'")


def test_a_shard_index_claiming_a_huge_chunk_is_refused(world, capsys):
    file = world.store / "wide/c/1/0/0"
    data = file.read_bytes()
    index = ShardIndex.decode(data[-ShardIndex.nbytes(2) :], 2).table.copy()
    index[1, 1] = 1 << 40
    file.write_bytes(data[: -ShardIndex.nbytes(2)] + Crc32c().encode(index.astype("<u8").tobytes()))
    with pytest.raises(CorruptChunkError, match=r"lists 1099511627776 bytes for the chunk, more than such a chunk"):
        wordystore.open(world.store).wide.numpy((slice(4, 8), slice(4, 8)))
    verify_lists(capsys, world.store, "'wide")


def test_inner_chunks_edited_to_multiply_the_reads_are_refused(world, capsys):
    edit(world.store / "embeddings/zarr.json", lambda d: d["codecs"][0]["configuration"].update(chunk_shape=[4, 1, 1]))
    refused(capsys, "info", world.store, r"array 'embeddings': its zarr\.json has shards and chunks")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("block_rows", "2", r"block_rows and chunk_rows: block_rows '2' must be a positive int"),
        ("chunk_rows", 2**40, r"chunk_rows 1099511627776 \(at most 4096\)"),
        ("store_id", "../x", r"store_id: '\.\./x' is not 32 hex digits"),
        (
            "predictions",
            {"momentum": {"name": "pickle"}},
            r"predictions: prediction 'pickle' is not one of \['adam', 'adamw_step'\]",
        ),
        ("format_version", 5, r"has format version 5; this wordystore reads versions 2, 3 and 4"),
    ],
)
def test_metadata_fields_of_the_wrong_kind_are_named(world, capsys, field, value, message):
    edit(world.store / "zarr.json", lambda d: meta_of(d).update({field: value}))
    refused(capsys, "info", world.store, message)


# -- files that are not regular files ----------------------------------------------------------------------


@pytest.mark.parametrize("make", ["fifo", "device link", "directory link"])
def test_a_shard_that_is_not_a_regular_file_is_refused_at_once(world, capsys, make):
    shard = world.store / "embeddings/c/1/0/0"
    shard.unlink()
    if make == "fifo":
        os.mkfifo(shard)
    elif make == "device link":
        shard.symlink_to("/dev/zero")
    else:  # the row block's directory leads outside the store, to a copy of it
        shutil.rmtree(shard.parent.parent)
        shard.parent.parent.symlink_to(world.outside / "rows")
    message = {
        "fifo": "is not a regular file",
        "device link": "is a symbolic link",
        "directory link": "is a symbolic link",
    }[make]
    with bounded(), pytest.raises(CorruptChunkError, match=message):
        wordystore.open(world.store).embeddings.numpy(slice(4, 8))
    verify_lists(capsys, world.store, rf"'embeddings/c/1/0/0'.*{message}")
    status, out, _ = cli(capsys, "info", world.store)
    assert status == 0 and "embeddings" in out  # info decodes nothing: it still describes the store


def test_a_document_that_is_a_fifo_is_refused_at_once(world, capsys):
    (world.store / "commit.json").unlink()
    os.mkfifo(world.store / "commit.json")
    refused(capsys, "info", world.store, r"commit\.json is not a regular file")


def test_a_linked_array_directory_is_refused_by_reader_and_writer(world, capsys):
    shutil.rmtree(world.store / "hot" / "losses")
    (world.store / "hot" / "losses").symlink_to(world.outside / "losses")
    refused(capsys, "info", world.store, r"hot/losses is a symbolic link")
    with pytest.raises(FormatError, match="is a symbolic link"):
        wordystore.resume(world.store)


# -- other documents a store holds ------------------------------------------------------------------------


def test_an_imported_store_whose_scalars_lack_one_is_a_clear_export_error(world, capsys, tmp_path):
    edit(world.store / "zarr.json", lambda d: meta_of(d)["config"]["seed_scalars"].pop("n_trained"))
    status, _, err = cli(capsys, "export", world.store, tmp_path / "x.safetensors")
    assert (
        status == 2
        and err.count("\n") == 1
        and re.search(r"config\['seed_scalars'\] lacks numbers for \['n_trained'\]", err)
    ), err
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize(
    "result",
    [
        {"ndarray": [1, 2], "dtype": "|O"},
        {"ndarray": [1], "dtype": "V100000000"},
        {"ndarray": "x", "dtype": 5},
        "not a result",
    ],
)
def test_a_hostile_analysis_cache_entry_is_recomputed(world, result):
    first = measures.moment_norms(wordystore.open(world.store), "trained", cache=True)
    (entry,) = (world.store / "analysis").glob("*.json")
    edit(entry, lambda d: d.update(result=result))
    again = measures.moment_norms(wordystore.open(world.store), "trained", cache=True)
    assert first.keys() == again.keys() and all(np.array_equal(first[k], again[k]) for k in first)
    assert json.loads(entry.read_text())["result"] != result  # replaced by the recomputed one


def test_the_pristine_store_reads_right(world):
    """The cases above start from a store that reads its recorded values."""
    read_everything(world.store)
    t = wordystore.open(world.store)
    for name in ("embeddings", "momentum", "grad_norm", "wide"):
        expected = np.stack([row(step)[name] for step in range(STEPS)])
        assert t[name].numpy().view(np.uint8).tobytes() == expected.view(np.uint8).tobytes(), name
    assert wordystore.verify(world.store).ok


# -- token sets, forged decoding parameters, binding records, metadata, leftovers -----------------------------


def metadata(store: Path) -> Metadata:
    return Metadata.from_root_json(json.loads((store / "zarr.json").read_text()), str(store))


def store_token_set(store: Path, name: str, ids: list[int]) -> None:
    """Token set ``name`` replaced by ``ids`` as the writer stores a set: encoded, bound to this store."""
    layout = metadata(store).token_set_layout(name, len(ids))
    shutil.rmtree(store / layout.path)
    (store / layout.path).mkdir()
    (store / layout.path / "zarr.json").write_text(json.dumps(layout.to_zarr_json()))
    data = np.asarray(ids, np.int64)
    for coords in np.ndindex(*layout.shard_grid()):
        shard = store / layout.shard_key(coords)
        shard.parent.mkdir(parents=True, exist_ok=True)
        shard.write_bytes(layout.encode_shard(coords, data[layout.shard_region(coords)]).tobytes())


@pytest.mark.parametrize(
    "ids, message",
    [
        ([-1, 3, 5], r"id -1 at position 0 is negative"),
        ([5, 3, 1], r"id 3 at position 1 comes after 5, out of order"),
        ([1, 3, 3, 5], r"id 3 at position 2 repeats the id before it"),
        ([1, 3, 5000], r"id 5000 at position 2 is past the vocabulary of 12 tokens"),
    ],
)
def test_a_token_set_of_bad_ids_is_refused_on_every_read(world, capsys, ids, message):
    store_token_set(world.store, "untrained", ids)
    line = rf"token set 'untrained' is damaged: {message}; a token set holds sorted, unique ids in \[0, 12\)"
    t = wordystore.open(world.store)
    with bounded(), pytest.raises(FormatError, match=line):
        t.token_set("untrained")
    with bounded(), pytest.raises(FormatError, match=line):  # never token 11's values for id -1
        t.embeddings[0, "untrained"]
    assert np.array_equal(t.token_set("trained"), SETS["trained"])  # the other set reads
    verify_lists(capsys, world.store, line)
    status, _, err = cli(capsys, "export", world.store, world.root.parent / "x.safetensors", "--tokens", "untrained")
    assert status == 2 and err.count("\n") == 1 and re.search(line, err), err
    assert not (world.root.parent / "x.safetensors").exists()


@pytest.mark.parametrize("ids", [[-1, 3, 5], [1, 3, 3, 5], [1, 3, 5000]])
def test_a_mask_file_of_bad_ids_is_refused(tmp_path, ids):
    from safetensors.numpy import save_file

    save_file(
        {"trained_indices": np.array([0, 2], np.int64), "untrained_indices": np.array(ids, np.int64)},
        str(tmp_path / "masks.safetensors"),
    )
    with pytest.raises(ValueError, match=r"masks\.safetensors: token set 'untrained' is not one: id -?\d+ at position"):
        token_sets_from_mask_file(tmp_path / "masks.safetensors", VOCAB)


def forge_beta(store: Path) -> None:
    """Adam's beta of the momentum 0.9 -> 0.8, in the metadata and the residual array's attributes alike."""
    edit(store / "zarr.json", lambda d: meta_of(d)["predictions"]["momentum"].update(beta=0.8))
    edit(store / "momentum.residuals/zarr.json", lambda d: meta_of(d)["prediction"].update(beta=0.8))


def forge_dtype(store: Path) -> None:
    """grad_norm's data type float32 -> int32, in the metadata and both tiers' arrays alike."""
    edit(store / "zarr.json", lambda d: meta_of(d)["kinds"]["grad_norm"].update(dtype="int32"))
    for array in ("grad_norm", "hot/grad_norm"):
        edit(store / array / "zarr.json", lambda d: d.update(data_type="int32"))


@pytest.mark.parametrize(
    "forge, kind, array",
    [(forge_beta, "momentum", "momentum.residuals"), (forge_dtype, "grad_norm", "grad_norm")],
    ids=["adam's beta", "a kind's data type"],
)
def test_decoding_parameters_forged_consistently_are_detected(world, capsys, forge, kind, array):
    forge(world.store)
    message = rf"'{array}/c/0[/0]*'.*binds other decoding parameters than the array's zarr\.json gives"
    with bounded(), pytest.raises(CorruptChunkError, match=message):
        wordystore.open(world.store)[kind].numpy(slice(0, 4))
    verify_lists(capsys, world.store, message)


def rewrite_record(shard: Path, layout, change) -> None:
    """The shard's binding record changed by ``change`` (a record -> a record), its crc32c made right."""
    data = shard.read_bytes()
    index, record = ShardIndex.nbytes(layout.n_chunks), BindingRecord.nbytes(layout.n_chunks, True)
    old = BindingRecord.decode(data[-index - record : -index], layout.n_chunks, True)
    shard.write_bytes(data[: -index - record] + change(old).encode() + data[-index:])


def test_a_binding_record_claiming_rows_its_shard_lacks_is_named_by_verify(world, capsys):
    layout = metadata(world.store).layouts("embeddings", STEPS)[0]
    shard = world.store / "embeddings/c/3/0/0"  # rows 12..13 of a chunk of 4
    rewrite_record(shard, layout, lambda r: dataclasses.replace(r, rows=4))
    expected = np.stack([row(step)["embeddings"] for step in (12, 13)])
    assert wordystore.open(world.store).embeddings.numpy(slice(12, 14)).tobytes() == expected.tobytes()
    verify_lists(
        capsys,
        world.store,
        r"wrong binding record: shard 'embeddings/c/3/0/0' of array 'embeddings' claims 4 written rows from "
        r"row 12, but the array holds 2 rows there",
    )
    rewrite_record(shard, layout, lambda r: dataclasses.replace(r, rows=2**64 - 1))
    message = r"its binding record claims 18446744073709551615 written rows, but the shard has 4"
    with bounded(), pytest.raises(CorruptChunkError, match=message):
        wordystore.open(world.store).embeddings.numpy(slice(12, 14))
    verify_lists(capsys, world.store, message)


def test_metadata_missing_or_extra_is_named_by_verify_and_restored_by_repair(world, capsys):
    edit(world.store / "momentum.residuals/zarr.json", lambda d: meta_of(d).pop("residuals_of"))
    edit(world.store / "zarr.json", lambda d: meta_of(d).update(comment="added"))
    t = wordystore.open(world.store)  # nothing it decodes is missing: it reads exactly
    expected = np.stack([row(step)["momentum"] for step in range(STEPS)])
    assert t.momentum.numpy().view(np.uint16).tobytes() == expected.view(np.uint16).tobytes()
    out = verify_lists(
        capsys, world.store, r"momentum\.residuals'?: its zarr\.json's attributes\.wordystore lacks \['residuals_of'\]"
    )
    assert "the metadata document adds ['comment']" in out, out
    status, out, _ = cli(capsys, "verify", "--repair", world.store)
    assert status == 0 and "rewrote momentum.residuals/zarr.json" in out and "rewrote zarr.json" in out, out
    assert meta_of(json.loads((world.store / "momentum.residuals/zarr.json").read_text()))["residuals_of"] == "momentum"
    assert "comment" not in meta_of(json.loads((world.store / "zarr.json").read_text()))
    assert wordystore.verify(world.store).ok


LEFTOVERS = [  # where zarr's LocalStore puts a key's temporary file: its suffix replaced by .<uuid hex>.partial
    "commit.0123456789abcdef0123456789abcdef.partial",
    "embeddings/c/1/0/0.fedcba9876543210fedcba9876543210.partial",
    "state/000000000013.00000000000000000000000000000000.partial",
]


def test_temporary_files_are_reported_by_verify_and_removed_by_repair_and_resume(world, capsys):
    for key in LEFTOVERS:
        (world.store / key).write_bytes(b"half a write")
    (world.store / "notes.partial").write_text("not a temporary file of the writer's")
    status, out, _ = cli(capsys, "verify", world.store)
    assert status == 0 and "3 temporary files a killed writer left (such as 'commit.0123" in out, out
    before = {p: p.read_bytes() for p in world.store.rglob("*") if p.is_file() and ".partial" not in p.name}
    status, out, _ = cli(capsys, "verify", "--repair", world.store)
    assert status == 0 and out.count("a temporary file a killed writer left") == 3, out
    assert not any((world.store / key).exists() for key in LEFTOVERS)
    after = {p: p.read_bytes() for p in world.store.rglob("*") if p.is_file() and ".partial" not in p.name}
    assert after.keys() == before.keys()  # nothing else changed (but the outcome verify records)
    assert all(after[p] == data for p, data in before.items() if p.name != "verified.json")
    assert (world.store / "notes.partial").exists()
    (world.store / LEFTOVERS[1]).write_bytes(b"half a write")
    wordystore.resume(world.store).close()
    assert not (world.store / LEFTOVERS[1]).exists() and (world.store / "notes.partial").exists()


KILLED_KINDS = {"x": Kind((512, 64), "float32", ("token", "dim")), "loss": Kind((), "float32", ())}


def append_until_killed(path: Path, first: int, ready: int) -> None:
    """A writer child: resume, say so, append rows (each a whole file's worth of writes) until killed."""
    w = wordystore.resume(path, writer_process=False)
    os.write(ready, b"resumed\n")
    step = w.last_step + 1 if w.last_step is not None else first
    while True:
        w.append(step, x=np.full((512, 64), step, np.float32), loss=np.float32(step))
        step += 1


def test_twenty_kills_and_resumes_leave_no_temporary_files(tmp_path):
    path = tmp_path / "killed.zarr"
    wordystore.create(path, KILLED_KINDS, block_rows=2, chunk_rows=4, writer_process=False).close()
    rng = np.random.default_rng(0)
    for _ in range(20):
        read, ready = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child writes until it is killed; it never returns to pytest
            try:
                append_until_killed(path, 0, ready)
            finally:
                os._exit(1)
        os.close(ready)
        with os.fdopen(read) as child:
            assert child.readline() == "resumed\n"
        time.sleep(rng.uniform(0.0, 0.05))
        os.kill(pid, signal.SIGKILL)
        assert os.waitpid(pid, 0)[1] == signal.SIGKILL  # killed, not failed (a kill mid-write leaves a file)
    wordystore.resume(path, writer_process=False).close()
    assert not list(path.rglob("*.partial")), "temporary files are left"
    t = wordystore.open(path)
    assert len(t) > 0 and np.array_equal(t.loss.numpy(), np.arange(len(t), dtype=np.float32))
    assert wordystore.verify(path).ok
