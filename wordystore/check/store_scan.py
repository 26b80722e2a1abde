"""One pass over a store for ``wordystore verify`` (:mod:`wordystore.check.verification`): its documents, then
every chunk of the rows a plan names, the steps, the token sets and the resume states, each problem
listed by array, chunk and rows; :mod:`wordystore.check.repair` rebuilds a commit record from a pass.

What is checked, in this order:

1. the metadata document (the root ``zarr.json``) and the group documents ``hot/zarr.json`` and
   ``token_sets/zarr.json``;
2. the commit record, and each array's ``zarr.json`` against the metadata (data type, shape,
   dimension names, shards and chunks, codecs, prediction) and against the record (its shape
   covers the rows the record admits);
3. what the documents claim against the shards present (listed): an array whose shape per row
   reaches past its shards is not read, and a record admitting more rows than the shards hold is
   set aside (below): nothing is allocated or enumerated by a claim the files cannot back;
4. every inner chunk of every committed row of every array, in the tier that holds it (main below
   ``compacted_rows``, hot above): shard present and a regular file, shard index checksum,
   binding record (format 3: the shard is the one of this store and key, holds the rows read, and
   each chunk is the one bound to its place), chunk present, chunk checksum, decode. Decoding goes
   through :class:`wordystore.read.reading.ChunkReader`, one shard per task on every core, nothing
   cached: memory stays at a few shards whatever the store's size;
5. ``recorded_steps`` strictly increasing from 0 or more, ending at the record's ``last_step``;
6. every token set: checksums, binding, and sorted unique ids on the token axis;
7. the resume states the record lists: present, of the size and CRC-32C the record gives (format
   3), readable safetensors, of the step their row holds.

A store whose commit record is missing, unreadable or set aside is checked all the same: its rows
are inferred from the arrays (each main array's ``zarr.json`` shape and shards present, and the
hot blocks present).
"""

from __future__ import annotations

import dataclasses
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from wordystore.errors import CorruptChunkError, FormatError
from wordystore.format.codecs import BindingRecord, ShardIndex
from wordystore.format.keys import (
    ATTRS_KEY,
    COMMIT_KEY,
    HOT_GROUP,
    STEPS_ARRAY,
    TIERS,
    TOKEN_SETS_GROUP,
    ZARR_JSON,
    document_key,
    is_chunk_key,
    token_set_path,
    token_set_problem,
    vocab_size,
)
from wordystore.format.layout import ArrayLayout
from wordystore.format.metadata import (
    Metadata,
    array_mismatch,
    attributes_problem,
    fields_problem,
    rows_held,
    rows_problem,
    width_problem,
)
from wordystore.format.records import CommitRecord
from wordystore.read import reading
from wordystore.store import json_documents, resume_state, storage
from wordystore.store.storage import describe

UNREADABLE = (CorruptChunkError, FormatError, OSError, ValueError)  # what damaged bytes raise while read


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a store."""

    where: str  # the array ('emb', 'hot/emb'), token set ('token_sets/x'), state or document ('commit.json')
    what: str  # one line naming what is broken
    rows: tuple[int, int] | None = None  # the rows [start, stop) whose data it damages, if any


@dataclass(frozen=True)
class VerifiedPrefix:
    """The longest prefix of rows whose every chunk verified: rows ``[0, compacted_rows)`` of it in
    the main tier, the rest up to ``committed_rows`` in the hot tier, and their training steps."""

    compacted_rows: int = 0
    committed_rows: int = 0
    steps: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))


@dataclass(frozen=True)
class ShardJob:
    """Check rows ``[lo, hi)`` of one shard of one array."""

    tier: str
    name: str
    layout: ArrayLayout
    coords: tuple[int, ...]
    lo: int
    hi: int


class StoreScan:
    """One pass over a store: the documents, then every chunk of the rows a plan names, the steps,
    the token sets and the resume states (:meth:`check` runs it all; :mod:`wordystore.check.repair` runs
    the pieces on a salvage plan)."""

    def __init__(self, store, progress: bool):
        self.store, self.where, self.progress = store, describe(store), progress
        self.problems: list[Problem] = []
        self.meta: Metadata | None = None
        self.record: CommitRecord | None = None
        self.old_record: dict | None = None  # the record's JSON, when it parses as JSON
        self.layouts: dict[tuple[str, str], ArrayLayout | None] = {}  # (tier, name) -> None if damaged
        self.unreadable: set[tuple[str, str]] = set()  # arrays whose zarr.json is missing or unreadable
        self.incomplete: set[tuple[str, str]] = set()  # arrays whose zarr.json lacks or adds attributes
        self.incomplete_metadata = False  # the metadata document lacks or adds fields
        self.leftovers: list[str] = []  # temporary files a killed writer left
        self.damaged_groups: list[str] = []
        self.damaged_sets: list[str] = []
        self.ok: dict[tuple[str, str], np.ndarray] = {}  # (tier, name) -> per row: every chunk verified
        self.steps: dict[str, np.ndarray] = {}  # tier -> recorded_steps per row (where read)
        self.hot_held: list[tuple[int, int]] = []  # rows [lo, hi) of the hot shards present (salvage plans)
        self.chunks = 0
        self.verified = VerifiedPrefix()
        self._scratch = threading.local()
        # Stored bytes are what is checked: a predicted moment's residuals are decoded, not rebuilt
        # (the gradient chunks it is rebuilt from are checked on their own).
        self._chunks = reading.ChunkReader(store, reading.ChunkCache(0), threads=1, rebuild=False)

    def problem(self, where: str, what: str, rows: tuple[int, int] | None = None) -> None:
        self.problems.append(Problem(where, " ".join(what.split()), rows))

    # -- the whole pass -------------------------------------------------------------------------

    def check(self) -> None:
        """The whole pass (module docstring), over the rows the commit record admits, or, without a
        readable record, over every row the arrays hold."""
        try:
            self.read_documents()
            if self.meta is None:
                return
            self.check_held()
            if self.record is None:  # infer the rows from the arrays
                self.scan(self.salvage_plan(math.inf, math.inf))
                self.verified = self.prefix(0, math.inf, extend=True)
            else:
                self.scan(self.record_plan())
                self.verified = self.prefix(self.record.compacted_rows, self.record.committed_rows, strict=True)
                self.check_record_steps()
                for entry in self.record.states:
                    why = self.state_problem(entry, self.verified.steps, self.record.committed_rows)
                    if why:
                        self.problem(str(entry.get("key")), f"resume state {entry.get('key')!r}: {why}")
            self.check_token_sets()
        finally:
            self.close()

    def close(self) -> None:
        self._chunks.close()

    def known_steps(self) -> np.ndarray | None:
        """The training step of each row the record admits; -1 where ``recorded_steps`` did not verify."""
        if self.record is None or not self.steps:
            return None
        known = np.full(self.record.committed_rows, -1, np.int64)
        for tier in TIERS:
            lo, hi = self.record.tiers.span(tier)
            ok = self.ok.get((tier, STEPS_ARRAY), np.zeros(0, bool))[lo:hi]
            steps = self.steps[tier][lo:hi]
            known[lo : lo + len(ok)] = np.where(ok, steps[: len(ok)], -1)
        return known

    # -- documents -------------------------------------------------------------------------------

    def read_documents(self) -> None:
        try:
            self.meta = json_documents.read_metadata(self.store)
        except (FormatError, FileNotFoundError) as exc:  # verify() has refused stores that are no trajectory
            self.problem(ZARR_JSON, f"{exc}; the arrays cannot be checked without it")
        self.read_record()
        self.leftovers = storage.temporary_keys(self.store)
        if self.meta is None:
            return
        root = json_documents.read_json(self.store, ZARR_JSON)["attributes"][ATTRS_KEY]
        incomplete = fields_problem("the metadata document", root, self.meta.to_json(), values=False)
        if incomplete:
            self.problem(ZARR_JSON, incomplete)
            self.incomplete_metadata = True
        groups = [HOT_GROUP] + ([TOKEN_SETS_GROUP] if self.meta.token_sets else [])
        for group in groups:
            key = document_key(group)
            try:
                doc = json_documents.read_json(self.store, key)
            except FormatError:
                doc = None
            if not (isinstance(doc, dict) and doc.get("node_type") == "group"):
                self.damaged_groups.append(key)
                self.problem(
                    key,
                    f"{key} is missing or is not a zarr group document (zarr readers cannot find the arrays under it)",
                )
        for name in self.meta.arrays():
            for tier in TIERS:
                self.layouts[tier, name] = self.read_layout(tier, name)

    def read_record(self) -> None:
        try:
            self.old_record = json_documents.read_json(self.store, COMMIT_KEY)
        except FormatError:
            pass
        try:
            self.record = json_documents.read_commit(self.store)
        except FormatError as exc:
            self.problem(COMMIT_KEY, str(exc))

    def check_held(self) -> None:
        """What the documents claim against the shards present (:func:`wordystore.format.metadata.rows_problem`,
        :func:`~wordystore.format.metadata.width_problem`): an array declaring more per row than its shards
        cover is not read; a record admitting more rows than the shards hold is set aside."""
        for name in self.meta.arrays():
            pair = [self.layouts.get((tier, name)) or self.expected_layout(tier, name, 0) for tier in TIERS]
            keys = storage.list_prefix(self.store, pair[1].chunk_prefix) + storage.list_prefix(
                self.store, pair[0].chunk_prefix
            )
            problem = width_problem(name, pair, keys)
            if problem:
                self.problem(pair[0].path, f"{problem}: the array is not read")
                for tier in TIERS:
                    self.layouts[tier, name] = None
            elif self.record is not None and rows_problem(name, pair, self.record, keys):
                self.problem(
                    COMMIT_KEY,
                    f"{rows_problem(name, pair, self.record, keys)}; the rows are inferred from the arrays instead",
                )
                self.record = None

    def expected_layout(self, tier: str, name: str, rows: int) -> ArrayLayout:
        """The layout the metadata determines for array ``name`` in ``tier``."""
        return self.meta.layouts(name, rows)[TIERS.index(tier)]

    def read_layout(self, tier: str, name: str) -> ArrayLayout | None:
        path = self.expected_layout(tier, name, 0).path
        try:
            layout = json_documents.read_layout(self.store, path, self.meta.binding)
            mismatch = array_mismatch(self.meta, tier, name, layout)
        except (FormatError, KeyError, TypeError, ValueError) as exc:  # Key...: e.g. a damaged prediction
            self.problem(
                path, str(exc) if isinstance(exc, FormatError) else f"array '{path}': zarr.json is damaged ({exc!r})"
            )
            self.unreadable.add((tier, name))
            return None
        if mismatch:
            self.problem(path, f"array '{path}': its zarr.json {mismatch}")
            return None
        incomplete = attributes_problem(layout, self.expected_layout(tier, name, 0))
        if incomplete:
            self.problem(path, f"array '{path}': its zarr.json's {incomplete}")
            self.incomplete.add((tier, name))
        return layout

    # -- chunks ----------------------------------------------------------------------------------

    def record_plan(self) -> list[ShardJob]:
        """Every shard of the rows the commit record admits, in the tier that holds them."""
        jobs = []
        for (tier, name), layout in self.layouts.items():
            lo, hi = self.record.tiers.span(tier)
            if layout is None or hi <= lo:
                continue
            if layout.shape[0] < hi:
                self.problem(
                    layout.path,
                    f"array '{layout.path}' holds {layout.shape[0]} rows but "
                    f"{COMMIT_KEY} admits rows {lo}..{hi - 1} in it",
                    (layout.shape[0], hi),
                )
            jobs += self._jobs(tier, name, layout, lo, min(hi, layout.shape[0]))
        return jobs

    def salvage_plan(self, compacted: float, committed: float) -> list[ShardJob]:
        """Every row the arrays hold, up to these bounds: the main tier's rows by its shape, the
        hot tier's in the blocks present (compaction deletes hot blocks: their absence is no damage)."""
        jobs = []
        for (tier, name), layout in self.layouts.items():
            if layout is None:
                continue
            present = storage.list_prefix(self.store, layout.chunk_prefix)
            hi = int(min(layout.shape[0], rows_held([layout], present), compacted if tier == "main" else committed))
            if tier == "main":
                jobs += self._jobs(tier, name, layout, 0, hi)
            else:
                present = set(present)
                held = [job for job in self._jobs(tier, name, layout, 0, hi) if layout.shard_key(job.coords) in present]
                self.hot_held.extend((job.lo, job.hi) for job in held)
                jobs += held
        return jobs

    def _jobs(self, tier: str, name: str, layout: ArrayLayout, lo: int, hi: int) -> list[ShardJob]:
        return [ShardJob(tier, name, layout, coords, a, b) for coords, a, b in layout.shards_holding(lo, hi)]

    def scan(self, jobs: list[ShardJob]) -> None:
        """Run the jobs on every core; mark their rows verified or not, listing each problem."""
        from tqdm.auto import tqdm

        rows = max([job.hi for job in jobs] + [0])
        for key in self.layouts:
            self.ok.setdefault(key, np.zeros(0, bool))
            self.ok[key] = np.concatenate([self.ok[key], np.zeros(max(0, rows - len(self.ok[key])), bool)])
        for tier in TIERS:
            self.steps.setdefault(tier, np.zeros(0, np.int64))
            self.steps[tier] = np.concatenate(
                [self.steps[tier], np.zeros(max(0, rows - len(self.steps[tier])), np.int64)]
            )
        with (
            ThreadPoolExecutor(reading.THREADS) as pool,
            tqdm(total=len(jobs), desc="verify", unit="shard", disable=not self.progress) as bar,
        ):
            for job, (problems, chunks) in zip(jobs, pool.map(self._check_shard, jobs)):
                self.ok[job.tier, job.name][job.lo : job.hi] = not problems
                self.problems.extend(problems)
                self.chunks += chunks
                bar.update()

    def _check_shard(self, job: ShardJob) -> tuple[list[Problem], int]:
        """Decode every chunk of the job's rows; on failure, find which chunks fail, and why."""
        layout = job.layout
        region = layout.shard_region(job.coords)
        fetch = (slice(job.lo, job.hi, 1), *(slice(r.start, r.stop, 1) for r in region[1:]))
        reads = reading.plan_reads([reading.Tier(layout, job.lo, job.hi)], fetch)
        if job.name == STEPS_ARRAY:
            out = self.steps[job.tier][job.lo : job.hi]
        else:
            out = self._buffer((job.hi - job.lo, *(r.stop - r.start for r in region[1:])), layout.numpy_dtype)
        try:
            self._chunks.execute(reads, out)
        except UNREADABLE:
            return self._diagnose(job, reads, out), len(reads)
        return self._overclaim(job), len(reads)

    def _overclaim(self, job: ShardJob) -> list[Problem]:
        """A main shard whose binding record claims rows past every row of the array (its zarr.json's
        shape and the rows the record admits): the values read are right, the record is not. (A hot
        block's record may run past the commit record: a writer writes the block before committing it.)"""
        layout = job.layout
        if job.tier != "main" or layout.binding is None:
            return []
        key = layout.shard_key(job.coords)
        first = job.coords[0] * layout.shard[0]
        rows = max(layout.shape[0], self.record.committed_rows if self.record else 0) - first
        try:
            tail = storage.get(self.store, key, suffix=layout.tail_nbytes)
            if tail is None:
                raise FileNotFoundError("it is gone")
            claimed = layout.decode_tail(tail, key).record.rows
        except UNREADABLE as exc:
            return [Problem(layout.path, f"shard '{key}' could not be read again: {exc}", (job.lo, job.hi))]
        if claimed <= rows:
            return []
        return [
            Problem(
                layout.path,
                f"wrong binding record: shard '{key}' of array '{layout.path}' claims {claimed} written rows "
                f"from row {first}, but the array holds {rows} rows there; the values read are right",
                (job.lo, job.hi),
            )
        ]

    def _diagnose(self, job: ShardJob, reads: list[reading.ChunkRead], out: np.ndarray) -> list[Problem]:
        layout, rows = job.layout, (job.lo, job.hi)
        key = layout.shard_key(job.coords)
        region = layout.shard_region(job.coords)
        span = ", ".join(
            [f"rows {job.lo}..{job.hi - 1}"]
            + [f"{d} {r.start}..{r.stop - 1}" for d, r in zip(layout.dims[1:2], region[1:2])]
        )
        try:
            tail = storage.get(self.store, key, suffix=layout.tail_nbytes)
        except FormatError as exc:
            return [Problem(layout.path, f"unreadable shard: '{key}' of array '{layout.path}' ({span}): {exc}", rows)]
        if tail is None:
            return [
                Problem(
                    layout.path,
                    f"missing shard: '{key}' of array '{layout.path}' ({span}) holds committed rows but does not exist",
                    rows,
                )
            ]
        try:
            layout.decode_tail(tail, key).check_rows(max(read.valid_rows for read in reads))
        except CorruptChunkError as exc:
            return [
                Problem(
                    layout.path,
                    f"corrupt shard: '{key}' of array '{layout.path}' ({span}): {exc}"
                    f"{self._origin(layout, key, tail)}; none of its chunks can be read",
                    rows,
                )
            ]
        problems = []
        for read in reads:  # one by one, to name each chunk that fails
            try:
                self._chunks.execute([read], out)
            except UNREADABLE as exc:
                problems.append(Problem(layout.path, " ".join(str(exc).split()), rows))
        return problems or [Problem(layout.path, f"shard '{key}' ({span}) could not be read as a whole", rows)]

    def _origin(self, layout: ArrayLayout, key: str, tail: bytes) -> str:
        """Where the bytes of shard ``key``, bound to another place, come from: the shard of this
        store its binding record names, or another store ("" if it is bound here, or has no record)."""
        if layout.binding is None:
            return ""
        try:
            record = BindingRecord.decode(
                tail[: -ShardIndex.nbytes(layout.n_chunks)], layout.n_chunks, layout.binding.decoding
            )
        except CorruptChunkError:
            return ""
        if record.place == layout.binding.place(key):
            return ""
        for other in storage.list_prefix(self.store, ""):
            if is_chunk_key(other) and layout.binding.place(other) == record.place:
                return f" (they are the bytes of '{other}')"
        return " (of no shard of this store: another store's?)"

    def _buffer(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """This thread's scratch buffer, grown as needed: one per thread, never one per shard."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        buffer = getattr(self._scratch, "buffer", None)
        if buffer is None or buffer.nbytes < nbytes:
            buffer = self._scratch.buffer = np.empty((max(nbytes, 1),), np.uint8)
        return buffer[:nbytes].view(dtype).reshape(shape)

    # -- rows that verify ------------------------------------------------------------------------

    def prefix(self, compacted: int, committed: float, strict: bool = False, extend: bool = False) -> VerifiedPrefix:
        """The longest prefix of rows whose every chunk verified:
        rows ``[0, compacted)`` from the main tier; with ``extend``, further rows from the main tier
        while no hot block holds them (a writer deletes hot copies only after committing their
        compaction: where one is present, the hot tier is the record's); then rows from the hot
        tier, up to ``committed``. Steps must increase: a step out of order ends the prefix, and
        is a problem when ``strict``."""

        def verified(tier: str) -> np.ndarray:  # rows whose chunks verified in every array of the tier
            masks = [mask for (t, _), mask in self.ok.items() if t == tier]
            return np.logical_and.reduce(masks) if masks else np.zeros(0, bool)

        def end_of_run(mask: np.ndarray, start: int, stop: float) -> int:  # where the run of True from start ends
            mask = mask[start : int(min(stop, len(mask)))]
            return start + (int(np.argmin(mask)) if not mask.all() else len(mask))

        main, hot = verified("main"), verified("hot")
        c = end_of_run(main, 0, compacted)
        if extend and c == compacted:
            free = main.copy()
            for lo, hi in self.hot_held:
                free[lo:hi] = False
            c = end_of_run(free, c, math.inf)
        r = end_of_run(hot, c, committed)
        steps = np.concatenate([self.steps["main"][:c], self.steps["hot"][c:r]]) if r else np.zeros(0, np.int64)
        bad = np.flatnonzero(np.r_[steps[:1] < 0, np.diff(steps) <= 0])
        if bad.size:
            i = int(bad[0])
            if strict:
                after = f"after step {steps[i - 1]}" if i else "(steps are >= 0)"
                self.problem(
                    STEPS_ARRAY, f"recorded_steps out of order: row {i} holds step {steps[i]} {after}", (i, i + 1)
                )
            r, c, steps = i, min(c, i), steps[:i]
        return VerifiedPrefix(c, r, steps)

    def check_record_steps(self) -> None:
        verified, record = self.verified, self.record
        if (
            verified.committed_rows == record.committed_rows
            and verified.committed_rows
            and verified.steps[-1] != record.last_step
        ):
            self.problem(
                COMMIT_KEY,
                f"{COMMIT_KEY} says the last step is {record.last_step} but "
                f"recorded_steps ends at {verified.steps[-1]}",
            )

    # -- token sets and resume states ------------------------------------------------------------

    def check_token_sets(self) -> None:
        try:
            vocab = vocab_size(self.meta.kinds)
        except ValueError as exc:
            self.problem(ZARR_JSON, f"the metadata document's kinds are inconsistent: {exc}")
            vocab = None
        for name in self.meta.token_sets:
            path = token_set_path(name)
            try:
                layout = json_documents.read_token_set_layout(self.store, self.meta, name)
                ids = self._chunks.read_whole(layout)
                self.chunks += layout.shard_grid()[0]
            except UNREADABLE as exc:
                self.damaged_sets.append(name)
                self.problem(path, str(exc))
                continue
            problem = token_set_problem(ids, vocab)
            if problem:
                self.damaged_sets.append(name)
                self.problem(path, f"token set '{name}' is damaged: {problem}")

    def state_problem(self, entry: dict, steps: np.ndarray, rows: int) -> str | None:
        """Why a resume state (a record's ``states`` entry) is unusable with ``rows`` committed rows,
        the first of which hold ``steps``; None if it is fine (read only if the entry is)."""
        problem = resume_state.entry_problem(entry, steps, rows)
        if problem:
            return problem
        try:
            return resume_state.file_problem(entry, resume_state.read_state(self.store, entry))
        except FormatError as exc:  # not a regular file, or larger than the record says
            return f"it cannot be read ({exc})"
