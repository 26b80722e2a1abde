"""The fault suite: kill -9 at 20 points, 59 corruptions of every kind of key, a full
disk, readers polling a writer, a writer dropped without close(); and `wordystore verify`.

Every store here records tests/faults_writer.py's run: six kinds (a predicted Adam moment among
them, and a kind whose shards hold two inner chunks), two token sets, resume states, blocks of 2
rows and chunks of 4. Its data is random per step and compared byte for byte.
"""

import gc
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faults_writer as fw
import numpy as np
import pytest
import torch
import zarr

import wordystore
from wordystore import CorruptChunkError, FormatError
from wordystore.cli import main
from wordystore.format.codecs import EMPTY, Crc32c, ShardIndex
from wordystore.format.keys import COMMIT_KEY, VERIFIED_KEY, WRITER_LOCK_KEY
from wordystore.store import json_documents, storage

DRIVER = Path(fw.__file__)


def drive(*args) -> dict:
    """Run faults_writer.py's driver; its JSON summary."""
    proc = subprocess.run([sys.executable, str(DRIVER), *map(str, args)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_rows(path, steps) -> wordystore.Trajectory:
    """The store holds exactly ``steps``' rows of the reference data, its token sets, and a resume
    state of one of its steps."""
    t = wordystore.open(path)
    assert t.steps.tolist() == list(steps)
    reference = fw.rows(steps)
    for name in fw.KINDS:
        assert t[name].numpy(slice(None)).tobytes() == reference[name].tobytes(), name
    assert {name: ids.tolist() for name, ids in t.token_sets.items()} == fw.TOKEN_SETS
    loaded = wordystore.load_state(path)
    if loaded is not None:
        tensors, info, step = loaded
        assert (
            step in steps
            and info == fw.state(step)[1]
            and torch.equal(tensors["weights"], fw.state(step)[0]["weights"])
        )
    return t


# -- kill -9 ------------------------------------------------------------------------------------------


def census_index(log: list[tuple[int, str, str, str]], op=None, key=None, phase=None, last=False, after=None) -> int:
    """The number of the census run's first (or last) store write matching: op, key (a regex), phase."""
    hits = [
        n
        for n, o, k, p in log
        if (op is None or o == op)
        and (key is None or re.search(key, k))
        and (phase is None or p == phase)
        and (after is None or n > after)
    ]
    return hits[-1] if last else hits[0]


MAIN_SHARD = r"^(?!hot/|token_sets/)[^/]+/c/"


def repeated_hot_shard(log) -> int:
    """The rewrite of the block the writer flushed while it was partial."""
    seen = set()
    for n, op, key, _ in log:
        if op == "put" and re.match(r"^hot/.*/c/", key):
            if key in seen:
                return n
            seen.add(key)
    raise AssertionError("the census run rewrote no hot block")


KILL_POINTS: dict[str, Callable] = {  # what the writer was doing when killed -> its write number in the census run
    "create: its first document": lambda log: census_index(log, phase="create"),
    "create: a token set's chunk": lambda log: census_index(log, key=r"^token_sets/a/c/"),
    "create: the metadata document": lambda log: census_index(log, key=r"^zarr\.json$", phase="create"),
    "create: its commit record": lambda log: census_index(log, key=r"^commit\.json$", phase="create"),
    "append: the first hot shard": lambda log: census_index(log, key=r"^hot/.*/c/", phase="append"),
    "append: a hot array's zarr.json": lambda log: census_index(log, key=r"^hot/wide/zarr\.json$", phase="append"),
    "append: the first resume state": lambda log: census_index(log, op="put", key=r"^state/"),
    "append: the first block's commit": lambda log: census_index(log, key=r"^commit\.json$", phase="append"),
    "append: rewriting the flushed partial block": repeated_hot_shard,
    "append: deleting an old resume state": lambda log: census_index(log, op="delete", key=r"^state/"),
    "append: midway": lambda log: [n for n, *_, p in log if p == "append"][
        len([1 for *_, p in log if p == "append"]) // 2
    ],
    "compaction: the first main shard": lambda log: census_index(log, key=MAIN_SHARD),
    "compaction: a predicted moment's shard": lambda log: census_index(log, key=r"^momentum\.residuals/c/"),
    "compaction: the main tier's zarr.json": lambda log: census_index(
        log, key=r"^recorded_steps/zarr\.json$", phase="append"
    ),
    "compaction: its commit": lambda log: census_index(
        log, key=r"^commit\.json$", after=census_index(log, key=r"^recorded_steps/zarr\.json$", phase="append")
    ),
    "compaction: deleting the hot copies": lambda log: census_index(log, op="delete", key=r"^hot/"),
    "close: its first write": lambda log: census_index(log, phase="close"),
    "close: a main shard of the last rows": lambda log: census_index(log, key=MAIN_SHARD, phase="close", last=True),
    "close: the last commit": lambda log: census_index(log, key=r"^commit\.json$", last=True),
    "close: its last write": lambda log: log[-1][0],
}


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """The census run (uninterrupted), then one run killed at each of KILL_POINTS."""
    out = tmp_path_factory.mktemp("kills")
    assert drive("census", out) == {"census": "finished"}
    log = [
        (int(n), op, key, phase)
        for n, op, key, phase in (line.split() for line in (out / "census.log").read_text().splitlines())
    ]
    points = {label: choose(log) for label, choose in KILL_POINTS.items()}
    outcomes = drive("kill", out, *sorted(set(points.values())))
    return out, points, {int(n): what for n, what in outcomes.items()}


@pytest.mark.parametrize("label", KILL_POINTS)
def test_kill_9_loses_no_committed_row_and_resume_matches_an_uninterrupted_run(killed, tmp_path, label):
    out, points, outcomes = killed
    assert outcomes[points[label]] == "killed"
    path = tmp_path / "t.zarr"
    shutil.copytree(out / f"kill-{points[label]}.zarr", path)
    if not (path / COMMIT_KEY).exists():  # died inside create: nothing was committed
        with pytest.raises(
            (FormatError, FileNotFoundError),
            match=r"has no zarr\.json"
            if not (path / "zarr.json").exists()
            else r"has no commit\.json.*`wordystore verify .* --repair`",
        ):
            wordystore.open(path)
        w, done = fw.create(path), 0  # a create that died is replaced by the next one
    else:
        done = len(assert_rows(path, fw.STEPS[: len(wordystore.open(path))]))
        report = wordystore.verify(path)
        assert report.ok and report.verified_rows == done, report.summary()
        w = wordystore.resume(path, keep_states=fw.KEEP_STATES)
    fw.append(w, fw.STEPS[done:])
    w.close()
    t, reference = assert_rows(path, fw.STEPS), wordystore.open(out / "reference.zarr")
    assert t.commit_record.committed_rows == t.commit_record.compacted_rows == reference.commit_record.committed_rows
    assert wordystore.load_state(path)[2] == wordystore.load_state(out / "reference.zarr")[2] == fw.STEPS[-1]


# -- corruptions ------------------------------------------------------------------------------------------

ROWS = 10  # the pristine store: rows 0..7 in the main tier (chunks of rows 0..3, 4..7), rows 8..9 in a hot block


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A store of 10 rows, 8 of them compacted, left as a running writer leaves it (the writer stays
    open until the module ends; copies of the store are not locked)."""
    path = tmp_path_factory.mktemp("pristine") / "p.zarr"
    w = fw.create(path)
    fw.append(w, fw.STEPS[:ROWS])
    w.flush()
    store, deadline = storage.as_store(path, read_only=True), time.monotonic() + 120
    while json_documents.read_commit(store).compacted_rows < 8 or any(
        (path / "hot" / name / "c" / "3").exists() for name in [*fw.KINDS, "recorded_steps"]
    ):
        assert time.monotonic() < deadline, "the background compaction did not finish"
        time.sleep(0.01)
    yield path
    w.close()


def flip(at: int):
    def mutate(file: Path):
        data = bytearray(file.read_bytes())
        data[at] ^= 0xFF
        file.write_bytes(bytes(data))

    return mutate


def truncate(keep: int):
    return lambda file: file.write_bytes(file.read_bytes()[:keep])


def delete(file: Path):
    file.unlink()


def empty(file: Path):
    file.write_bytes(b"")


def shard_index(file: Path, chunks: int) -> tuple[bytes, np.ndarray]:
    """A ``wide`` shard's bytes and its index (2 inner chunks in the main tier, 1 in the hot tier)."""
    data = file.read_bytes()
    return data, ShardIndex.decode(data[-ShardIndex.nbytes(chunks) :], chunks).table.copy()


def in_chunk(i: int, chunks: int = 2):
    """Flip a byte inside inner chunk ``i`` of a shard."""

    def mutate(file: Path):
        _, index = shard_index(file, chunks)
        flip(int(index[i, 0]) + 5)(file)

    return mutate


def drop_chunk(i: int, chunks: int = 2):
    """Mark inner chunk ``i`` absent in the shard index, with a valid checksum."""

    def mutate(file: Path):
        data, index = shard_index(file, chunks)
        index[i] = EMPTY
        file.write_bytes(data[: -ShardIndex.nbytes(chunks)] + Crc32c().encode(index.astype("<u8").tobytes()))

    return mutate


def edit(change: Callable[[dict], None]):
    def mutate(file: Path):
        doc = json.loads(file.read_bytes())
        change(doc)
        file.write_text(json.dumps(doc))

    return mutate


def codecs_of(doc: dict) -> list:
    return doc["codecs"][0]["configuration"]["codecs"]


@dataclass(frozen=True)
class Corruption:
    key: str
    mutate: Callable[[Path], None]
    names: str  # a regex the error and a verify problem must match: what is broken
    rows_after: int | None  # rows a repair keeps; None: it cannot rebuild the record (it stays as it was)
    ok_after: bool = True  # whether the store verifies after the repair
    drops_state: bool = False  # whether the repair drops a resume state from the record


MAIN0, MAIN1, HOT = 0, 4, 8  # rows left when a main chunk of rows 0..3, of rows 4..7, or the hot block is lost
CORRUPTIONS = {
    # main tier data: chunk payloads, shard indexes (crc and entries), truncation, deletion
    "main emb: flipped data byte": Corruption("emb/c/0/0/0", flip(5), "'emb", MAIN0),
    "main emb: flipped index byte": Corruption("emb/c/0/0/0", flip(-3), "'emb", MAIN0),
    "main emb: truncated": Corruption("emb/c/1/0/0", truncate(-7), "'emb", MAIN1),
    "main emb: deleted": Corruption("emb/c/1/0/0", delete, "'emb", MAIN1),
    "main emb: emptied": Corruption("emb/c/1/0/0", empty, "'emb", MAIN1),
    "main wide: second inner chunk flipped": Corruption("wide/c/0/0/0", in_chunk(1), "'wide", MAIN0),
    "main wide: first inner chunk flipped": Corruption("wide/c/1/0/0", in_chunk(0), "'wide", MAIN1),
    "main wide: inner chunk missing from a valid index": Corruption(
        "wide/c/1/0/0", drop_chunk(1), "missing chunk.*'wide", MAIN1
    ),
    "main momentum (predicted): flipped": Corruption("momentum.residuals/c/1/0/0", flip(5), "'momentum", MAIN1),
    "main momentum (predicted): truncated": Corruption("momentum.residuals/c/0/0/0", truncate(20), "'momentum", MAIN0),
    "main momentum (predicted): deleted": Corruption("momentum.residuals/c/1/0/0", delete, "'momentum", MAIN1),
    "main grads: flipped": Corruption("grads/c/1/0/0", flip(8), "'grads", MAIN1),
    "main grads: last byte cut": Corruption("grads/c/0/0/0", truncate(-1), "'grads", MAIN0),
    "main loss (scalar): flipped": Corruption("loss/c/0", flip(5), "'loss", MAIN0),
    "main loss (scalar): deleted": Corruption("loss/c/1", delete, "'loss", MAIN1),
    "main loss (scalar): truncated": Corruption("loss/c/1", truncate(-20), "'loss", MAIN1),
    "main grad_norm (scalar): flipped": Corruption("grad_norm/c/1", flip(3), "'grad_norm", MAIN1),
    "main grad_norm (scalar): emptied": Corruption("grad_norm/c/0", empty, "'grad_norm", MAIN0),
    "main recorded_steps: flipped": Corruption("recorded_steps/c/0", flip(5), "'recorded_steps", MAIN0),
    "main recorded_steps: deleted": Corruption("recorded_steps/c/0", delete, "'recorded_steps", MAIN0),
    "main recorded_steps: index flipped": Corruption("recorded_steps/c/1", flip(-1), "'recorded_steps", MAIN1),
    "main recorded_steps: truncated": Corruption("recorded_steps/c/1", truncate(-5), "'recorded_steps", MAIN1),
    # hot tier data
    "hot emb: flipped data byte": Corruption("hot/emb/c/4/0/0", flip(5), "'hot/emb", HOT),
    "hot emb: flipped index byte": Corruption("hot/emb/c/4/0/0", flip(-5), "'hot/emb", HOT),
    "hot emb: deleted": Corruption("hot/emb/c/4/0/0", delete, "'hot/emb", HOT),
    "hot emb: emptied": Corruption("hot/emb/c/4/0/0", empty, "'hot/emb", HOT),
    "hot wide: inner chunk flipped": Corruption("hot/wide/c/4/0/0", in_chunk(0, chunks=1), "'hot/wide", HOT),
    "hot wide: inner chunk missing from a valid index": Corruption(
        "hot/wide/c/4/0/0", drop_chunk(0, chunks=1), "missing chunk.*'hot/wide", HOT
    ),
    "hot loss (scalar): flipped": Corruption("hot/loss/c/4", flip(5), "'hot/loss", HOT),
    "hot loss (scalar): deleted": Corruption("hot/loss/c/4", delete, "'hot/loss", HOT),
    "hot recorded_steps: flipped": Corruption("hot/recorded_steps/c/4", flip(5), "'hot/recorded_steps", HOT),
    "hot recorded_steps: truncated": Corruption("hot/recorded_steps/c/4", truncate(10), "'hot/recorded_steps", HOT),
    "hot momentum: deleted": Corruption("hot/momentum/c/4/0/0", delete, "'hot/momentum", HOT),
    "hot grad_norm (scalar): index flipped": Corruption("hot/grad_norm/c/4", flip(-2), "'hot/grad_norm", HOT),
    # token sets: no row is lost, but the set stays damaged (a repair cannot rebuild it)
    "token set: flipped data byte": Corruption("token_sets/a/c/0", flip(5), "'token_sets/a", ROWS, False),
    "token set: flipped index byte": Corruption("token_sets/a/c/0", flip(-2), "'token_sets/a", ROWS, False),
    "token set: deleted": Corruption("token_sets/b/c/0", delete, "'token_sets/b", ROWS, False),
    "token set: truncated": Corruption("token_sets/a/c/0", truncate(-3), "'token_sets/a", ROWS, False),
    "token set: zarr.json shape shortened": Corruption(
        "token_sets/b/zarr.json", edit(lambda d: d.update(shape=[2])), "'token_sets/b", ROWS, False
    ),
    # array and group documents: rebuilt from the metadata when unreadable; left alone when they disagree with it
    "main emb zarr.json: deleted": Corruption("emb/zarr.json", delete, "'emb'", ROWS),
    "hot loss zarr.json: not JSON": Corruption("hot/loss/zarr.json", truncate(30), r"hot/loss/zarr\.json", ROWS),
    "main recorded_steps zarr.json: shape shortened": Corruption(
        "recorded_steps/zarr.json", edit(lambda d: d.update(shape=[3])), r"'recorded_steps' holds 3", ROWS
    ),
    "main wide zarr.json: data type edited": Corruption(
        "wide/zarr.json", edit(lambda d: d.update(data_type="float16")), "'wide'.*data type float16", None, False
    ),
    "main grads zarr.json: transpose edited": Corruption(
        "grads/zarr.json",
        edit(lambda d: codecs_of(d)[0]["configuration"].update(order=[2, 1, 0])),
        "'grads'.*transpose",
        None,
        False,
    ),
    "hot group zarr.json: deleted": Corruption("hot/zarr.json", delete, r"hot/zarr\.json", ROWS),
    # the commit record
    "commit.json: deleted": Corruption("commit.json", delete, r"commit\.json", ROWS),
    "commit.json: not JSON": Corruption("commit.json", truncate(20), r"commit\.json", ROWS),
    "commit.json: more rows than the arrays hold": Corruption(
        "commit.json", edit(lambda d: d.update(committed_rows=100)), r"commit\.json admits", ROWS
    ),
    "commit.json: a wrong last step": Corruption(
        "commit.json", edit(lambda d: d.update(last_step=99)), r"commit\.json says the last step is 99", ROWS
    ),
    "commit.json: fewer rows compacted than were": Corruption(
        "commit.json", edit(lambda d: d.update(compacted_rows=4)), "missing shard.*'hot/", ROWS
    ),
    "commit.json: a resume state's step edited": Corruption(
        "commit.json", edit(lambda d: d["states"][-1].update(step=99)), "resume state.*step 99", ROWS, drops_state=True
    ),
    # the metadata document: nothing can be checked or rebuilt without it
    "zarr.json (root): deleted": Corruption("zarr.json", delete, r"no zarr\.json", None, False),
    "zarr.json (root): not JSON": Corruption("zarr.json", truncate(100), r"zarr\.json is not valid JSON", None, False),
    "zarr.json (root): a kind's shape edited": Corruption(
        "zarr.json",
        edit(lambda d: d["attributes"]["wordystore"]["kinds"]["emb"].update(shape=[12, 2])),
        r"kinds: kinds disagree on the length of the token axis: \[6, 12\]",
        None,
        False,
    ),
    "zarr.json (root): format version edited": Corruption(
        "zarr.json",
        edit(lambda d: d["attributes"]["wordystore"].update(format_version=5)),
        "format version 5",
        None,
        False,
    ),
    # resume states: safetensors files (a repair drops a damaged one from the record; the file stays)
    "state: header length flipped": Corruption(
        "state/000000000009.safetensors", flip(0), "state/000000000009", ROWS, drops_state=True
    ),
    "state: header JSON flipped": Corruption(
        "state/000000000009.safetensors", flip(8), "state/000000000009", ROWS, drops_state=True
    ),
    "state: deleted": Corruption(
        "state/000000000009.safetensors", delete, "state/000000000009", ROWS, drops_state=True
    ),
    "state: older one truncated": Corruption(
        "state/000000000007.safetensors", truncate(50), "state/000000000007", ROWS, drops_state=True
    ),
}


def files(path: Path) -> dict[str, bytes]:
    return {
        str(f.relative_to(path)): f.read_bytes()
        for f in path.rglob("*")
        if f.is_file() and f.name not in (WRITER_LOCK_KEY, VERIFIED_KEY)
    }


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_every_corruption_is_named_never_read_as_other_values_and_repair_keeps_what_verifies(pristine, tmp_path, name):
    case = CORRUPTIONS[name]
    path = tmp_path / "s.zarr"
    shutil.copytree(pristine, path)
    record = json.loads((path / COMMIT_KEY).read_bytes())
    case.mutate(path / case.key)

    try:  # reading gives the recorded values, or an error naming what is broken
        assert_rows(path, fw.STEPS[: len(wordystore.open(path))])
    except (CorruptChunkError, FormatError, FileNotFoundError) as exc:
        assert re.search(case.names, str(exc)), str(exc)

    report = wordystore.verify(path)
    assert not report.ok and report.exit_status == 1
    assert any(re.search(case.names, p.what) for p in report.problems), report.summary()

    before = files(path)
    repaired = wordystore.verify(path, repair=True)
    after = files(path)
    for key, data in before.items():  # nothing deleted; what was rewritten has its old bytes kept
        assert key in after, f"the repair deleted {key}"
        if after[key] != data:
            assert key in repaired.repair.rewritten
            assert any(after[b] == data for b in repaired.repair.backups if b.startswith(f"{key}.")), key
    assert repaired.ok == case.ok_after, repaired.summary()
    if case.rows_after is None:  # it could not rebuild the record: left as it was, and it says why
        assert json.loads((path / COMMIT_KEY).read_bytes()) == record and repaired.repair.not_saved
        return
    assert repaired.verified_rows == case.rows_after, repaired.summary()
    t = assert_rows(path, fw.STEPS[: case.rows_after]) if case.ok_after else wordystore.open(path)
    assert len(t) == case.rows_after
    assert bool(repaired.repair.not_saved) == (case.rows_after < ROWS or not case.ok_after or case.drops_state)


# -- verify's command line, info, resume of a damaged store ------------------------------------------------


def damaged_copy(pristine, tmp_path) -> Path:
    path = tmp_path / "d.zarr"
    shutil.copytree(pristine, path)
    flip(5)(path / "emb/c/1/0/0")
    return path


def test_verify_command_exit_status_and_listing(pristine, tmp_path, capsys):
    good = tmp_path / "g.zarr"
    shutil.copytree(pristine, good)
    assert main(["verify", "--quiet", str(good)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{good}: 10 rows committed (8 compacted); 25 chunks checked",
        "ok: every row verifies (rows 0..9, training steps 1..28)",
    ]

    bad = damaged_copy(pristine, tmp_path)
    assert main(["verify", "--quiet", str(bad)]) == 1
    out = capsys.readouterr().out
    assert re.search(
        r"^  corrupt chunk: array 'emb' chunk \(1, 0, 0\) \(step 4\.\.7, token 0\.\.5, dim 0\.\.1\) of .*: "
        r"crc32c checksum mismatch \[training steps 13\.\.22\]$",
        out,
        re.M,
    ), out
    assert "rows that verify: rows 0..3, training steps 1..10" in out and f"`wordystore verify {bad} --repair`" in out

    assert main(["verify", "--quiet", str(bad), "--repair"]) == 1  # rows 4..9 could not be saved
    out = capsys.readouterr().out
    assert re.search(r"^repair: commit\.json admits 4 rows \(4 compacted\)$", out, re.M), out
    assert re.search(r"^  kept the old bytes as commit\.json\.\d{8}T\d{6}Z\.bak$", out, re.M), out
    assert re.search(
        r"^  could not save: rows 4\.\.9 committed: corrupt chunk: array 'emb' chunk \(1, 0, 0\)", out, re.M
    ), out
    assert main(["verify", "--quiet", str(bad)]) == 0


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, r"no trajectory at .*missing\.zarr"),
        (lambda p: zarr.open_group(p, mode="w"), r"missing\.zarr is a zarr group but not a wordystore trajectory"),
    ],
)
def test_verify_of_something_else_is_a_user_error_and_changes_nothing(tmp_path, capsys, make, message):
    path = tmp_path / "missing.zarr"
    make(path)
    before = sorted(tmp_path.rglob("*"))
    assert main(["verify", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err
    assert sorted(tmp_path.rglob("*")) == before  # not even a lock file


def test_verify_of_a_store_being_written_is_refused(pristine, capsys):
    assert main(["verify", str(pristine)]) == 2  # the fixture's writer holds it
    assert "is open for writing by another writer" in capsys.readouterr().err


def test_info_says_when_the_store_was_verified_and_spots_missing_shards(pristine, tmp_path, capsys):
    path = tmp_path / "i.zarr"
    shutil.copytree(pristine, path)

    def info() -> str:
        assert main(["info", str(path)]) == 0
        return capsys.readouterr().out.splitlines()[1].strip()

    assert info() == "never verified (`wordystore verify` checks every chunk)"
    wordystore.verify(path)
    stamp = json.loads((path / VERIFIED_KEY).read_text())
    assert stamp["committed_rows"] == ROWS and stamp["problems"] == 0
    assert info() == f"verified {stamp['time']}: no problems"
    with wordystore.resume(path) as w:
        fw.append(w, fw.STEPS[ROWS:])
    assert info() == f"not verified since rows were added (verified {stamp['time']} at 10 rows: no problems)"
    (path / "loss/c/1").unlink()
    assert info().startswith(
        f"DAMAGED: 1 shard(s) of committed rows are missing (e.g. loss/c/1); run `wordystore verify {path}`"
    )


@pytest.mark.parametrize("mutate", [delete, truncate(20)], ids=["missing", "not JSON"])
def test_resume_of_a_store_whose_commit_record_is_damaged_refuses_and_points_to_repair(pristine, tmp_path, mutate):
    path = tmp_path / "r.zarr"
    shutil.copytree(pristine, path)
    mutate(path / COMMIT_KEY)
    before = files(path)
    with pytest.raises(FormatError, match=rf"commit\.json.*`wordystore verify {re.escape(str(path))} --repair`"):
        wordystore.resume(path)
    assert files(path) == before  # nothing truncated, nothing deleted
    assert wordystore.verify(path, repair=True).verified_rows == ROWS
    with wordystore.resume(path) as w:
        fw.append(w, fw.STEPS[ROWS:])
    assert_rows(path, fw.STEPS)


def test_verify_decodes_in_bounded_memory(tmp_path):
    """Memory is a few shards, not the store: 64 rows of two kinds of 64 KiB a row are 8 MB raw."""
    import tracemalloc

    kinds = {name: fw.KINDS["wide"] for name in ("w1", "w2")}
    rng = np.random.default_rng(0)
    with wordystore.create(tmp_path / "m.zarr", kinds, block_rows=2, chunk_rows=4) as w:
        for step in range(64):
            row = rng.standard_normal((8, 4096)).astype(np.float32).astype(fw.ml_dtypes.bfloat16)
            w.append(step, w1=row, w2=row)
    tracemalloc.start()
    try:
        report = wordystore.verify(tmp_path / "m.zarr")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.ok and report.chunks == 2 * 64 // 4 * 2 + 64 // 4  # 2 inner chunks per shard; recorded_steps
    raw = 2 * 64 * 8 * 4096 * 2
    assert peak < raw / 3, f"verify held {peak / 1e6:.1f} MB at once for a {raw / 1e6:.1f} MB store"


# -- a full disk, readers polling a writer, a writer dropped without close() -----------------------------


def test_a_full_disk_is_a_clear_error_and_committed_rows_stay_intact(tmp_path, small_tmpfs):
    disk = small_tmpfs("600k", "a failure of the background writer is tested in test_errors.py")
    path = disk / "full.zarr"
    with pytest.raises(wordystore.WriterFailedError, match=r"full\.zarr failed; (\d+) rows are committed") as failure:
        with fw.create(path) as w:
            fw.append(w, fw.STEPS)
    cause = failure.value.__cause__
    assert isinstance(cause, OSError) and cause.strerror == "No space left on device", repr(cause)
    committed = int(re.search(r"; (\d+) rows are committed", str(failure.value))[1])
    assert 0 < committed < len(fw.STEPS)
    assert len(assert_rows(path, fw.STEPS[:committed])) == committed
    report = wordystore.verify(path)  # on the full disk: the check stands, though it cannot be recorded
    assert report.ok and report.verified_rows == committed
    subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)  # space again: the run goes on
    with wordystore.resume(path, keep_states=fw.KEEP_STATES) as w:
        fw.append(w, fw.STEPS[committed:])
    assert_rows(path, fw.STEPS)
    assert wordystore.verify(path).ok


def test_four_readers_polling_a_writer_only_ever_see_committed_prefixes_of_the_data(tmp_path):
    outcomes = drive("readers", tmp_path)
    assert outcomes == {"writer": "finished", **{f"reader{i}": "finished" for i in range(4)}}, outcomes
    counts = [json.loads((tmp_path / f"reader{i}.json").read_text()) for i in range(4)]
    for c in counts:
        assert c["reads"] >= 3 and c["rows_seen"][-1] == len(fw.READ_STEPS), c
    assert len({n for c in counts for n in c["rows_seen"]}) >= 4, counts  # they saw the store grow


def test_a_writer_dropped_without_close_releases_its_lock(tmp_path):
    w = fw.create(tmp_path / "t.zarr")
    fw.append(w, fw.STEPS[:3])
    w.flush()
    del w
    gc.collect()
    with wordystore.resume(tmp_path / "t.zarr", keep_states=fw.KEEP_STATES) as w:  # not StoreLockedError
        fw.append(w, fw.STEPS[3:5])
    assert_rows(tmp_path / "t.zarr", fw.STEPS[:5])
