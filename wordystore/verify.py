"""``wordystore verify``: check every committed byte of a trajectory, and rebuild its commit record
from what verifies.

>>> report = wordystore.verify("runs/wb1b.zarr")
>>> report.ok, report.verified_rows
(True, 201)
>>> print(report.summary())                           # what `wordystore verify` prints
>>> wordystore.verify("runs/wb1b.zarr", repair=True)  # `wordystore verify --repair`

What is checked, in this order:

1. the metadata document (the root ``zarr.json``) and the group documents ``hot/zarr.json`` and
   ``token_sets/zarr.json``;
2. the commit record, and each array's ``zarr.json`` against the metadata (data type, shape,
   dimension names, rows per chunk, transpose, serializer, Adam prediction) and against the
   record (its shape covers the rows the record admits);
3. every inner chunk of every committed row of every array, in the tier that holds it (main below
   ``compacted_rows``, hot above): shard present, shard index checksum, chunk present, chunk
   checksum, decode. Decoding goes through :class:`wordystore.reading.ChunkReader`, one shard per
   task on every core, nothing cached: memory stays at a few shards whatever the store's size;
4. ``recorded_steps`` strictly increasing from 0 or more, ending at the record's ``last_step``;
5. every token set: checksums, and sorted unique ids on the token axis;
6. the resume states the record lists: present, readable safetensors, of the step their row holds.

A store whose commit record is missing or unreadable is checked all the same: its rows are
inferred from the arrays (each main array's ``zarr.json`` shape, and the hot blocks present).

``repair=True`` never deletes or rewrites a chunk. It rebuilds the documents that the metadata
determines (an array's ``zarr.json``, a group's) when they are missing or unreadable (one that
disagrees with the metadata is left alone, and so is the record: which of the two is wrong cannot
be told), then writes a commit record admitting the longest prefix of rows that verifies in every
array, at most the rows the old record admitted: the main tier's rows below the old record's
``compacted_rows``, and past it while no hot block holds the row (a writer deletes hot copies only
after committing their compaction), then the hot tier's. Each replaced document's old bytes are
kept under ``<key>.<UTC time>.bak``; what could not be saved is listed. Rows past the new record
stay on disk until a writer appends over them: copying the backup over ``commit.json`` undoes it.

Every run records its outcome in ``verified.json`` (``{"committed_rows", "time", "problems"}``),
which ``wordystore info`` shows; :func:`missing_shards` is the cheap check ``info`` makes itself.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from wordystore import format, reading, storage
from wordystore.codecs import decode_shard_index, shard_index_nbytes
from wordystore.errors import CorruptChunkError, FormatError
from wordystore.storage import WriterLock, as_store, describe

VERIFIED_KEY = "verified.json"
TIERS = ("main", "hot")
STATE_KEY = re.compile(rf"^{format.STATE_PREFIX}/(\d+)\.safetensors$")
UNREADABLE = (CorruptChunkError, FormatError, OSError, ValueError)  # what damaged bytes raise while read


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a store."""

    where: str  # the array ('emb', 'hot/emb'), token set ('token_sets/x'), state or document ('commit.json')
    what: str  # one line naming what is broken
    rows: tuple[int, int] | None = None  # the rows [start, stop) whose data it damages, if any


@dataclass(frozen=True)
class Repair:
    """What ``repair=True`` did."""

    old_record: dict | None  # the commit record before (None: missing or unreadable)
    record: format.CommitRecord | None  # the commit record written (None: none could be)
    rewritten: tuple[str, ...]  # keys rebuilt: documents, then commit.json
    backups: tuple[str, ...]  # where the replaced documents' old bytes are kept
    not_saved: tuple[str, ...]  # what could not be saved, one line each


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of :func:`verify`: ``ok`` when nothing is wrong; ``summary()`` says it all."""

    store: str
    record: format.CommitRecord | None  # the commit record checked (None: missing or unreadable)
    verified_rows: int  # the longest prefix of rows that verifies in every array
    steps: np.ndarray  # the training steps of those rows
    chunks: int  # inner chunks checked
    problems: tuple[Problem, ...]
    repair: Repair | None = None
    note: str | None = None  # set when the outcome could not be recorded in verified.json
    known_steps: np.ndarray | None = None  # per row checked, its training step (-1 where recorded_steps is damaged)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def exit_status(self) -> int:
        """0 when the store verifies and a repair lost nothing; else 1 (``wordystore verify``'s status)."""
        return 0 if self.ok and not (self.repair and self.repair.not_saved) else 1

    def summary(self) -> str:
        """What ``wordystore verify`` prints: the outcome, each problem, the repair."""
        rows = f"{self.record.committed_rows} rows committed ({self.record.compacted_rows} compacted)" \
            if self.record else "no readable commit record"
        lines = [f"{self.store}: {rows}; {self.chunks} chunks checked"]
        if self.ok:
            lines.append(f"ok: every row verifies ({_rows_text(0, self.verified_rows, self.steps)})")
        else:
            lines.append(f"{len(self.problems)} problem{'s' * (len(self.problems) != 1)}:")
            lines.extend(f"  {p.what}{self._steps_of(p.rows)}" for p in self.problems)
            lines.append(f"rows that verify: {_rows_text(0, self.verified_rows, self.steps)}")
            if self.repair is None:
                lines.append(f"`wordystore verify {self.store} --repair` rebuilds the commit record from the rows "
                             "that verify (and the documents the metadata determines); it deletes nothing")
        if self.repair is not None:
            r = self.repair
            if r.record is not None:
                lines.append(f"repair: commit.json admits {r.record.committed_rows} rows "
                             f"({r.record.compacted_rows} compacted)")
            lines.extend(f"  rewrote {key}" for key in r.rewritten)
            lines.extend(f"  kept the old bytes as {key}" for key in r.backups)
            lines.extend(f"  could not save: {line}" for line in r.not_saved)
            if not (r.rewritten or r.not_saved):
                lines.append("  nothing to repair")
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)

    def _steps_of(self, rows: tuple[int, int] | None) -> str:
        steps = self.known_steps if self.known_steps is not None else self.steps
        if rows is None or rows[1] > len(steps) or np.any(steps[rows[0] : rows[1]] < 0):
            return ""
        return f" [training steps {steps[rows[0]]}..{steps[rows[1] - 1]}]"


def _rows_text(start: int, stop: int, steps: np.ndarray) -> str:
    if stop <= start:
        return "none"
    return f"rows {start}..{stop - 1}, training steps {steps[start]}..{steps[stop - 1]}"


def verify(where, *, repair: bool = False, progress: bool = False) -> VerifyReport:
    """Check the trajectory at ``where`` end to end (module docstring); with ``repair``, rebuild
    its commit record from the rows that verify. Takes the writer lock: no writer may be running.

    >>> report = wordystore.verify("runs/wb1b.zarr")
    >>> [p.what for p in report.problems]
    []
    """
    looking = as_store(where, read_only=True)  # refuse what is no trajectory before making or locking anything
    try:
        format.read_metadata(looking)
    except (FormatError, FileNotFoundError):
        if not _looks_like_a_trajectory(looking):
            raise
    store = as_store(where, read_only=False)
    lock = WriterLock(store)
    try:
        check = _Check(store, progress)
        check.run()
        done = None
        if repair and check.problems:
            done = _repair(store, check, progress)
            check = _Check(store, progress)
            check.run()
        report = check.report(done)
        try:
            format.write_json(store, VERIFIED_KEY, {
                "committed_rows": report.record.committed_rows if report.record else 0,
                "time": _now().isoformat(timespec="seconds"), "problems": len(report.problems)})
        except OSError as exc:  # e.g. a full disk: the check stands, unrecorded
            return dataclasses.replace(report, note=f"this check was not recorded in {VERIFIED_KEY}: "
                                                    f"{exc.strerror or exc}")
        return report
    finally:
        lock.release()


def _looks_like_a_trajectory(store) -> bool:
    """A store whose metadata does not read is a damaged trajectory, rather than something else,
    if it has a format-2 commit record or a hot tier."""
    try:
        doc = format.read_json(store, format.COMMIT_KEY)
        hot = storage.exists(store, f"{format.HOT_GROUP}/zarr.json")
    except FileNotFoundError:  # a read-only store whose directory does not exist
        return False
    except FormatError:
        doc, hot = None, storage.exists(store, f"{format.HOT_GROUP}/zarr.json")
    version = doc.get("format_version") if isinstance(doc, dict) else None
    return version == format.FORMAT_VERSION or hot


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


@dataclass(frozen=True)
class _Job:
    """Check rows ``[lo, hi)`` of one shard of one array."""

    tier: str
    name: str
    layout: format.ArrayLayout
    coords: tuple[int, ...]
    lo: int
    hi: int


def _shards(layout: format.ArrayLayout, lo: int, hi: int):
    """(shard coordinates, first row, end row) of every shard holding rows ``[lo, hi)``."""
    rows = layout.shard[0]
    for r in range(lo // rows, math.ceil(hi / rows) if hi > lo else 0):
        for rest in np.ndindex(*layout.shard_grid()[1:]):
            yield (r, *rest), max(lo, r * rows), min(hi, (r + 1) * rows)


class _Check:
    """One pass over a store: the documents, then every chunk of the rows a plan names, the steps,
    the token sets and the resume states."""

    def __init__(self, store, progress: bool):
        self.store, self.where, self.progress = store, describe(store), progress
        self.problems: list[Problem] = []
        self.meta: format.Metadata | None = None
        self.record: format.CommitRecord | None = None
        self.old_record: dict | None = None  # the record's JSON, when it parses as JSON
        self.layouts: dict[tuple[str, str], format.ArrayLayout | None] = {}  # (tier, name) -> None if damaged
        self.unreadable: set[tuple[str, str]] = set()  # arrays whose zarr.json is missing or unreadable
        self.damaged_groups: list[str] = []
        self.damaged_sets: list[str] = []
        self.ok: dict[tuple[str, str], np.ndarray] = {}  # (tier, name) -> per row: every chunk verified
        self.steps: dict[str, np.ndarray] = {}  # tier -> recorded_steps per row (where read)
        self.hot_held: list[tuple[int, int]] = []  # rows [lo, hi) of the hot shards present (salvage plans)
        self.chunks = 0
        self.verified = (0, 0, np.zeros(0, np.int64))  # (compacted, committed, steps) of the verified prefix
        self._scratch = threading.local()
        self._reader = reading.ChunkReader(store, reading.ChunkCache(0), threads=1)

    def problem(self, where: str, what: str, rows: tuple[int, int] | None = None) -> None:
        self.problems.append(Problem(where, " ".join(what.split()), rows))

    # -- the whole pass -------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self.read_documents()
            if self.meta is None:
                return
            if self.record is None:  # infer the rows from the arrays
                self.scan(self.salvage_plan(math.inf, math.inf))
                self.verified = self.prefix(0, math.inf, extend=True)
            else:
                self.scan(self.record_plan())
                self.verified = self.prefix(self.record.compacted_rows, self.record.committed_rows, strict=True)
                self.check_record_steps()
                for entry in self.record.states:
                    why = self.state_problem(entry, self.verified[2], self.record.committed_rows)
                    if why:
                        self.problem(str(entry.get("key")), f"resume state {entry.get('key')!r}: {why}")
            self.check_token_sets()
        finally:
            self._reader.close()

    def report(self, repair: Repair | None) -> VerifyReport:
        return VerifyReport(self.where, self.record, self.verified[1], self.verified[2], self.chunks,
                            tuple(self.problems), repair, known_steps=self.known_steps())

    def known_steps(self) -> np.ndarray | None:
        """The training step of each row the record admits; -1 where ``recorded_steps`` did not verify."""
        if self.record is None or not self.steps:
            return None
        compacted, committed = self.record.compacted_rows, self.record.committed_rows
        known = np.full(committed, -1, np.int64)
        for tier, (lo, hi) in (("main", (0, compacted)), ("hot", (compacted, committed))):
            ok = self.ok.get((tier, format.STEPS_ARRAY), np.zeros(0, bool))[lo:hi]
            steps = self.steps[tier][lo:hi]
            known[lo : lo + len(ok)] = np.where(ok, steps[: len(ok)], -1)
        return known

    # -- documents -------------------------------------------------------------------------------

    def read_documents(self) -> None:
        try:
            self.meta = format.read_metadata(self.store)
        except (FormatError, FileNotFoundError) as exc:  # verify() has refused stores that are no trajectory
            self.problem("zarr.json", f"{exc}; the arrays cannot be checked without it")
        self.read_record()
        if self.meta is None:
            return
        groups = [format.HOT_GROUP] + ([format.TOKEN_SETS_GROUP] if self.meta.token_sets else [])
        for group in groups:
            key = f"{group}/zarr.json"
            try:
                doc = format.read_json(self.store, key)
            except FormatError:
                doc = None
            if not (isinstance(doc, dict) and doc.get("node_type") == "group"):
                self.damaged_groups.append(key)
                self.problem(key, f"{key} is missing or is not a zarr group document "
                                  "(zarr readers cannot find the arrays under it)")
        for name in self.meta.arrays():
            for tier in TIERS:
                self.layouts[tier, name] = self.read_layout(tier, name)

    def read_record(self) -> None:
        try:
            self.old_record = format.read_json(self.store, format.COMMIT_KEY)
        except FormatError:
            pass
        try:
            self.record = format.read_commit(self.store)
        except FormatError as exc:
            self.problem(format.COMMIT_KEY, str(exc))

    def expected_layout(self, tier: str, name: str, rows: int) -> format.ArrayLayout:
        """The layout the metadata determines for array ``name`` in ``tier``."""
        return self.meta.layouts(name, rows)[TIERS.index(tier)]

    def read_layout(self, tier: str, name: str) -> format.ArrayLayout | None:
        path = self.expected_layout(tier, name, 0).path
        try:
            layout = format.read_layout(self.store, path)
            mismatch = format.layout_mismatch(layout, self.expected_layout(tier, name, 0))
        except (FormatError, KeyError, TypeError, ValueError) as exc:  # Key...: e.g. a damaged prediction
            self.problem(path, str(exc) if isinstance(exc, FormatError) else f"array '{path}': zarr.json is damaged ({exc!r})")
            self.unreadable.add((tier, name))
            return None
        if mismatch:
            self.problem(path, f"array '{path}': its zarr.json {mismatch}")
            return None
        return layout

    # -- chunks ----------------------------------------------------------------------------------

    def record_plan(self) -> list[_Job]:
        """Every shard of the rows the commit record admits, in the tier that holds them."""
        compacted, committed = self.record.compacted_rows, self.record.committed_rows
        jobs = []
        for (tier, name), layout in self.layouts.items():
            lo, hi = (0, compacted) if tier == "main" else (compacted, committed)
            if layout is None or hi <= lo:
                continue
            if layout.shape[0] < hi:
                self.problem(layout.path, f"array '{layout.path}' holds {layout.shape[0]} rows but "
                                          f"{format.COMMIT_KEY} admits rows {lo}..{hi - 1} in it", (layout.shape[0], hi))
            jobs += self._jobs(tier, name, layout, lo, min(hi, layout.shape[0]))
        return jobs

    def salvage_plan(self, compacted: float, committed: float) -> list[_Job]:
        """Every row the arrays hold, up to these bounds: the main tier's rows by its shape, the
        hot tier's in the blocks present (compaction deletes hot blocks: their absence is no damage)."""
        jobs = []
        for (tier, name), layout in self.layouts.items():
            if layout is None:
                continue
            hi = int(min(layout.shape[0], compacted if tier == "main" else committed))
            if tier == "main":
                jobs += self._jobs(tier, name, layout, 0, hi)
            else:
                present = set(storage.list_prefix(self.store, f"{layout.path}/c/"))
                held = [job for job in self._jobs(tier, name, layout, 0, hi) if layout.shard_key(job.coords) in present]
                self.hot_held.extend((job.lo, job.hi) for job in held)
                jobs += held
        return jobs

    def _jobs(self, tier: str, name: str, layout: format.ArrayLayout, lo: int, hi: int) -> list[_Job]:
        # Stored bytes are what is checked: a predicted moment's residuals decode without their
        # prediction (the gradient chunks it is rebuilt from are checked on their own).
        layout = dataclasses.replace(layout, attributes={})
        return [_Job(tier, name, layout, coords, a, b) for coords, a, b in _shards(layout, lo, hi)]

    def scan(self, jobs: list[_Job]) -> None:
        """Run the jobs on every core; mark their rows verified or not, listing each problem."""
        from tqdm.auto import tqdm

        rows = max([job.hi for job in jobs] + [0])
        for key in self.layouts:
            self.ok.setdefault(key, np.zeros(0, bool))
            self.ok[key] = np.concatenate([self.ok[key], np.zeros(max(0, rows - len(self.ok[key])), bool)])
        for tier in TIERS:
            self.steps.setdefault(tier, np.zeros(0, np.int64))
            self.steps[tier] = np.concatenate([self.steps[tier], np.zeros(max(0, rows - len(self.steps[tier])), np.int64)])
        with ThreadPoolExecutor(reading.THREADS) as pool, \
                tqdm(total=len(jobs), desc="verify", unit="shard", disable=not self.progress) as bar:
            for job, (problems, chunks) in zip(jobs, pool.map(self._check_shard, jobs)):
                self.ok[job.tier, job.name][job.lo:job.hi] = not problems
                self.problems.extend(problems)
                self.chunks += chunks
                bar.update()

    def _check_shard(self, job: _Job) -> tuple[list[Problem], int]:
        """Decode every chunk of the job's rows; on failure, find which chunks fail, and why."""
        layout = job.layout
        region = layout.shard_region(job.coords)
        fetch = (slice(job.lo, job.hi, 1), *(slice(r.start, r.stop, 1) for r in region[1:]))
        reads = reading.plan_reads([reading.Tier(layout, job.lo, job.hi)], fetch)
        if job.name == format.STEPS_ARRAY:
            out = self.steps[job.tier][job.lo:job.hi]
        else:
            out = self._buffer((job.hi - job.lo, *(r.stop - r.start for r in region[1:])), layout.numpy_dtype)
        try:
            self._reader.read_into(reads, out)
            return [], len(reads)
        except UNREADABLE:
            return self._diagnose(job, reads, out), len(reads)

    def _diagnose(self, job: _Job, reads: list[reading.ChunkRead], out: np.ndarray) -> list[Problem]:
        layout, rows = job.layout, (job.lo, job.hi)
        key = layout.shard_key(job.coords)
        region = layout.shard_region(job.coords)
        span = ", ".join([f"rows {job.lo}..{job.hi - 1}"] + [f"{d} {r.start}..{r.stop - 1}"
                                                             for d, r in zip(layout.dims[1:2], region[1:2])])
        n_chunks = int(np.prod(layout.chunks_per_shard))
        tail = storage.get(self.store, key, suffix=shard_index_nbytes(n_chunks))
        if tail is None:
            return [Problem(layout.path, f"missing shard: '{key}' of array '{layout.path}' ({span}) holds committed "
                                         "rows but does not exist", rows)]
        try:
            decode_shard_index(tail, n_chunks)
        except CorruptChunkError as exc:
            return [Problem(layout.path, f"corrupt shard index: '{key}' of array '{layout.path}' ({span}): {exc}; "
                                         "none of its chunks can be found", rows)]
        problems = []
        for read in reads:  # one by one, to name each chunk that fails
            try:
                self._reader.read_into([read], out)
            except UNREADABLE as exc:
                problems.append(Problem(layout.path, " ".join(str(exc).split()), rows))
        return problems or [Problem(layout.path, f"shard '{key}' ({span}) could not be read as a whole", rows)]

    def _buffer(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """This thread's scratch buffer, grown as needed: one per thread, never one per shard."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        buffer = getattr(self._scratch, "buffer", None)
        if buffer is None or buffer.nbytes < nbytes:
            buffer = self._scratch.buffer = reading.empty((max(nbytes, 1),), np.uint8)
        return buffer[:nbytes].view(dtype).reshape(shape)

    # -- rows that verify ------------------------------------------------------------------------

    def prefix(self, compacted: int, committed: float, strict: bool = False,
               extend: bool = False) -> tuple[int, int, np.ndarray]:
        """(compacted, committed, steps) of the longest prefix of rows whose every chunk verified:
        rows ``[0, compacted)`` from the main tier; with ``extend``, further rows from the main tier
        while no hot block holds them (a writer deletes hot copies only after committing their
        compaction: where one is present, the hot tier is the record's); then rows from the hot
        tier, up to ``committed``. Steps must increase: a step out of order ends the prefix, and
        is a problem when ``strict``."""
        def verified(tier: str) -> np.ndarray:  # rows whose chunks verified in every array of the tier
            masks = [mask for (t, _), mask in self.ok.items() if t == tier]
            return np.logical_and.reduce(masks) if masks else np.zeros(0, bool)

        def run(mask: np.ndarray, start: int, stop: float) -> int:  # the end of the run of True from start
            mask = mask[start : int(min(stop, len(mask)))]
            return start + (int(np.argmin(mask)) if not mask.all() else len(mask))

        main, hot = verified("main"), verified("hot")
        c = run(main, 0, compacted)
        if extend and c == compacted:
            free = main.copy()
            for lo, hi in self.hot_held:
                free[lo:hi] = False
            c = run(free, c, math.inf)
        r = run(hot, c, committed)
        steps = np.concatenate([self.steps["main"][:c], self.steps["hot"][c:r]]) if r else np.zeros(0, np.int64)
        bad = np.flatnonzero(np.r_[steps[:1] < 0, np.diff(steps) <= 0])
        if bad.size:
            i = int(bad[0])
            if strict:
                after = f"after step {steps[i - 1]}" if i else "(steps are >= 0)"
                self.problem(format.STEPS_ARRAY, f"recorded_steps out of order: row {i} holds step {steps[i]} {after}",
                             (i, i + 1))
            r, c, steps = i, min(c, i), steps[:i]
        return c, r, steps

    def check_record_steps(self) -> None:
        compacted, committed, steps = self.verified
        record = self.record
        if committed == record.committed_rows and committed and steps[-1] != record.last_step:
            self.problem(format.COMMIT_KEY, f"{format.COMMIT_KEY} says the last step is {record.last_step} but "
                                            f"recorded_steps ends at {steps[-1]}")

    # -- token sets and resume states ------------------------------------------------------------

    def check_token_sets(self) -> None:
        from wordystore.writer import _vocab_size

        try:
            vocab = _vocab_size(self.meta.kinds)
        except ValueError as exc:
            self.problem("zarr.json", f"the metadata document's kinds are inconsistent: {exc}")
            vocab = None
        for name in self.meta.token_sets:
            path = f"{format.TOKEN_SETS_GROUP}/{name}"
            try:
                layout = format.read_token_set_layout(self.store, name)
                ids = np.empty(layout.shape, np.int64)
                self._reader.read_into(reading.plan_reads([reading.Tier(layout, 0, len(ids))],
                                                          (slice(0, len(ids), 1),)), ids)
                self.chunks += layout.shard_grid()[0]
            except UNREADABLE as exc:
                self.damaged_sets.append(name)
                self.problem(path, str(exc))
                continue
            if ids.size and (np.any(np.diff(ids) <= 0) or ids[0] < 0 or (vocab is not None and ids[-1] >= vocab)):
                self.damaged_sets.append(name)
                self.problem(path, f"token set '{name}' holds ids that are not sorted, unique and in [0, {vocab})")

    def state_problem(self, entry: dict, steps: np.ndarray, rows: int) -> str | None:
        """Why a resume state (a record's ``states`` entry) is unusable with ``rows`` committed rows,
        the first of which hold ``steps``; None if it is fine."""
        from safetensors.torch import load

        key, row, step = entry.get("key"), entry.get("row"), entry.get("step")
        if not isinstance(key, str) or not STATE_KEY.match(key) or not isinstance(row, int) or not isinstance(step, int):
            return f"the record's entry {entry} is not a state (key, row, step)"
        if row >= rows:
            return f"it is of row {row}, past the {rows} committed rows"
        if row < len(steps) and steps[row] != step:
            return f"it is of row {row}, step {step}, but that row holds step {steps[row]}"
        data = storage.get(self.store, key)
        if data is None:
            return "it is missing"
        try:
            load(data)
            header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
            if (int(header["row"]), int(header["step"])) != (row, step):
                return f"it holds row {header['row']}, step {header['step']}; the record says row {row}, step {step}"
            json.loads(header["info"])
        except Exception as exc:  # safetensors raises its own SafetensorError
            return f"it is not a readable resume state ({type(exc).__name__}: {exc})"
        return None


# -- repair ----------------------------------------------------------------------------------------


def _repair(store, found: _Check, progress: bool) -> Repair:
    """Rebuild the documents the metadata determines, then the commit record from the rows that verify."""
    stamp = _now().strftime("%Y%m%dT%H%M%SZ")
    rewritten, backups, not_saved = [], [], []
    record = found.record
    if found.meta is None:
        return Repair(found.old_record, record, (), (), ("the metadata document (zarr.json) is damaged and cannot be "
                                                         "rebuilt: restore it from a copy",))
    lost_sets = tuple(f"token set '{name}' is damaged; store it again with TrajectoryWriter.add_token_set"
                      for name in found.damaged_sets)

    def replace(key: str, document: dict) -> None:
        old = storage.get(store, key)
        if old is not None:
            backups.append(_backup(store, key, old, stamp))
        format.write_json(store, key, document, durable=True)
        rewritten.append(key)

    for key in found.damaged_groups:
        replace(key, format.GROUP_JSON)
    for (tier, name), layout in found.layouts.items():
        # An array's zarr.json is rebuilt when it is unreadable, or when its shape misses rows its
        # shards hold (then the record needing them may be right); the shape covers those shards.
        expected = found.expected_layout(tier, name, 0)
        held = _rows_in_shards(store, expected)
        needed = 0 if record is None else record.compacted_rows if tier == "main" else record.committed_rows
        if (tier, name) in found.unreadable or (layout is not None and layout.shape[0] < min(needed, held)):
            replace(f"{expected.path}/zarr.json", found.expected_layout(tier, name, held).to_zarr_json())
    disagree = [f"{'hot/' * (tier == 'hot')}{name}" for (tier, name), layout in found.layouts.items()
                if layout is None and (tier, name) not in found.unreadable]
    if disagree:  # which of the two documents is wrong cannot be told: leave both, and the record
        return Repair(found.old_record, record, tuple(rewritten), tuple(backups), (
            f"the commit record was left as it is: the zarr.json of {', '.join(disagree)} disagrees with the "
            "metadata document; restore whichever is wrong from a copy, then repair again",) + lost_sets)

    salvage = _Check(store, progress)
    try:  # every row the arrays hold (the main tier's by its shape, the hot blocks present), up to the record's
        salvage.read_documents()
        salvage.scan(salvage.salvage_plan(math.inf, record.committed_rows if record else math.inf))
        compacted, committed, steps = salvage.prefix(record.compacted_rows if record else 0,
                                                     record.committed_rows if record else math.inf, extend=True)
        candidates = record.states if record else _states_present(store)
        states = tuple(s for s in candidates if salvage.state_problem(s, steps, committed) is None)
    finally:
        salvage._reader.close()
    not_saved += [f"resume state {s.get('key')!r}: {salvage.state_problem(s, steps, committed)}"
                  for s in (record.states if record else ()) if s not in states]
    new = format.CommitRecord(committed, compacted, int(steps[-1]) if committed else None, states)
    if new != record:
        old = storage.get(store, format.COMMIT_KEY)
        if old is not None:
            backups.append(_backup(store, format.COMMIT_KEY, old, stamp))
        format.write_commit(store, new, durable=True)
        rewritten.append(format.COMMIT_KEY)
    held = max(layout.shape[0] for layout in salvage.layouts.values())
    held = min(held, record.committed_rows) if record else held
    if held > committed:
        cause = [p for p in salvage.problems if p.rows and p.rows[1] > committed]  # the one at the cut first
        first = min(cause, key=lambda p: p.rows[0] > committed).what if cause else None
        lost = "committed" if record else "found in the arrays (some maybe never committed, or padding)"
        not_saved.append(f"rows {committed}..{held - 1} {lost}" + (f": {first}" if first else ""))
    return Repair(found.old_record, new, tuple(rewritten), tuple(backups), tuple(not_saved) + lost_sets)


def _rows_in_shards(store, layout: format.ArrayLayout) -> int:
    """The rows up to the end of the array's last shard present (by listing; temporary files aside)."""
    key = re.compile(rf"^{re.escape(layout.path)}/c/(\d+)(/\d+)*$")
    found = [key.match(k) for k in storage.list_prefix(store, f"{layout.path}/c/")]
    return max([(int(m[1]) + 1) * layout.shard[0] for m in found if m] + [0])


def _backup(store, key: str, data: bytes, stamp: str) -> str:
    """Keep a document's old bytes beside it under a key no other backup has; returns the key."""
    backup, n = f"{key}.{stamp}.bak", 1
    while storage.exists(store, backup):
        backup, n = f"{key}.{stamp}-{n}.bak", n + 1
    storage.put(store, backup, data)
    storage.sync_to_disk(store, [backup])
    return backup


def _states_present(store) -> tuple[dict, ...]:
    """Resume states found by their keys (when there is no record to name them), oldest first."""
    found = []
    for key in storage.list_prefix(store, f"{format.STATE_PREFIX}/"):
        data = storage.get(store, key) if STATE_KEY.match(key) else None
        if data is None:
            continue
        try:
            header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]
            found.append({"row": int(header["row"]), "step": int(header["step"]), "key": key})
        except Exception:  # unreadable: state_problem() would refuse it anyway
            continue
    return tuple(sorted(found, key=lambda s: s["row"]))


# -- what `wordystore info` shows ----------------------------------------------------------------------


def verification_status(t) -> str:
    """One line on when the trajectory ``t`` was last verified (from ``verified.json``)."""
    try:
        doc = format.read_json(t._store, VERIFIED_KEY)
        rows, time, problems = doc["committed_rows"], doc["time"], doc["problems"]
    except (FormatError, TypeError, KeyError):
        return "never verified (`wordystore verify` checks every chunk)"
    found = "no problems" if problems == 0 else f"{problems} problem{'s' * (problems != 1)} found"
    if rows == len(t):
        return f"verified {time}: {found}"
    if rows < len(t):
        return f"not verified since rows were added (verified {time} at {rows} rows: {found})"
    return f"not verified since the commit record changed (verified {time} at {rows} rows: {found})"


def missing_shards(t) -> list[str]:
    """The shard keys the committed rows of ``t`` need that the store lacks: a cheap check of the
    trajectory's integrity (it lists keys, decodes nothing). A writer compacting meanwhile may
    delete hot shards: if any are missing, the check is made again after ``t.refresh()``."""
    for attempt in range(2):
        present = set(storage.list_prefix(t._store, ""))
        compacted, committed = t._record.compacted_rows, t._record.committed_rows
        needed = []
        for main, hot in t._layouts.values():
            for layout, lo, hi in ((main, 0, compacted), (hot, compacted, committed)):
                needed += [layout.shard_key(coords) for coords, _, _ in _shards(layout, lo, hi)]
        missing = [key for key in needed if key not in present]
        if not missing or attempt:
            return missing
        t.refresh()
    return missing
