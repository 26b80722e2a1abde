"""Streaming analyses of a trajectory: how far tokens move, when they freeze, how the optimizer's
state and the loss evolve; read straight from the store, in bounded memory.

>>> import wordystore
>>> from wordystore import analysis
>>> t = wordystore.open("runs/wb1b.zarr")
>>> s = analysis.embedding_stats(t, "untrained")     # one streaming pass over the embeddings
>>> s.table["displacement_max"][-1]                  # the notebook's verification cell: 4.55e-01
>>> s.freeze_step                                    # per token: the step it froze at, -1 if still moving
>>> analysis.moment_norms(t, "untrained")["variance"]
>>> analysis.curves(t)["losses"]

Results are plain numpy arrays, or *tables*: dicts of equal-length numpy arrays whose first column,
``step``, is the training step of each row. Every function reads through the public reader
(``t[kind].numpy((rows, ids))``) in blocks of rows x tokens, so its peak memory stays below
``max_bytes`` plus a few float32 rows of the token selection, however many steps the store holds.

On a ``dask.distributed`` cluster: :func:`embedding_stats` and :func:`moment_norms` take ``client=``,
or use the current client (``distributed.get_client()``) when there is one. Each block of rows is
then a task of its own (it reads the rows it compares with itself), the results are the same bits
as in this process, and the tasks carry the trajectory as where to reopen it, never credentials
(each worker finds its own).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from wordystore.errors import FormatError, StorageError
from wordystore.format.keys import ANALYSIS_PREFIX
from wordystore.read.trajectory import Trajectory
from wordystore.store import json_documents

Table = dict[str, np.ndarray]
Tokens = str | Sequence[int] | np.ndarray | None

MAX_BYTES = 64 * 2**20  # default memory budget of one streaming pass, in bytes
ROWS_PER_BLOCK = 32  # at most this many rows are held at once
WORK_BYTES_PER_VALUE = 24  # float32 copies, differences and lattice indices of one value while a tile is worked on
READ_BYTES_PER_VALUE = (
    16  # measured: the reader's compressed, decoded and transposed chunks, the fetched and the picked block
)
CACHE_PREFIX = ANALYSIS_PREFIX  # cached results live under analysis/<name>-<digest>.json in the store
CACHE_VERSION = 1


# -- what to read ----------------------------------------------------------------------------------


def resolve_tokens(t: Trajectory, tokens: Tokens, kind: str = "embeddings") -> tuple[str, np.ndarray]:
    """(label, token ids) for a token-set name, a list or array of ids, or None (every token).

    >>> resolve_tokens(t, "untrained")   # ("untrained", array([...]))
    """
    n_tokens = _token_axis_length(t, kind)
    if tokens is None:
        return "all", np.arange(n_tokens, dtype=np.int64)
    if isinstance(tokens, str):
        ids = t.token_set(tokens)
        if ids.size == 0:
            raise ValueError(f"token set {tokens!r} is empty: no tokens to analyse")
        return tokens, ids
    ids = np.asarray(tokens)
    if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
        raise ValueError(
            f"tokens must be a token-set name, a non-empty 1-D list of token ids, or None for all; got {tokens!r}"
        )
    if ids.min() < 0 or ids.max() >= n_tokens:
        bad = ids[(ids < 0) | (ids >= n_tokens)][0]
        raise ValueError(f"token id {bad} is out of range: kind {kind!r} has {n_tokens} tokens")
    return f"{ids.size} tokens", ids.astype(np.int64)


def _token_axis_length(t: Trajectory, kind: str) -> int:
    if kind not in t.kinds:
        raise ValueError(f"no kind {kind!r}; this trajectory records {list(t.kinds)}")
    spec = t.kinds[kind]
    if not spec.dims or spec.dims[0] != "token":
        raise ValueError(f"kind {kind!r} has dims {spec.dims}; per-token analysis needs 'token' as its first axis")
    return spec.shape[0]


@dataclass(frozen=True)
class _Blocks:
    """How one pass streams a kind over a token selection: rows per block, tokens per tile.

    A block of ``rows`` rows of the selection is held whole in the kind's dtype (about half of
    ``max_bytes``); it is read ``read_tile`` tokens at a time and worked on ``tile`` tokens at a
    time, so that the reader's or the work's temporaries take the other half.
    """

    t: Trajectory
    kind: str
    ids: np.ndarray
    rows: int
    tile: int
    read_tile: int

    @classmethod
    def plan(cls, t: Trajectory, kind: str, ids: np.ndarray, max_bytes: int) -> _Blocks:
        if len(t) == 0:
            raise ValueError("the trajectory has no committed rows yet: nothing to analyse")
        spec = t.kinds[kind]
        width = math.prod(spec.shape[1:])
        rows = max(1, min(ROWS_PER_BLOCK, (max_bytes // 2) // max(ids.size * width * spec.numpy_dtype.itemsize, 1)))
        per_chunk = t.metadata.get("chunk_rows")  # a hint: whole chunks of rows decode once, not twice
        if isinstance(per_chunk, int) and rows > per_chunk:
            rows -= rows % per_chunk
        tile, read_tile = (
            max(1, (max_bytes // 2) // (rows * width * per_value))
            for per_value in (WORK_BYTES_PER_VALUE, READ_BYTES_PER_VALUE)
        )
        return cls(t.uncached(), kind, ids, rows, tile, read_tile)

    @property
    def width(self) -> int:
        return math.prod(self.t.kinds[self.kind].shape[1:])

    def row_blocks(self, progress: bool, label: str) -> Iterator[slice]:
        from tqdm.auto import tqdm

        n = len(self.t)
        with tqdm(total=n, desc=f"{self.kind} [{label}]", unit="step", disable=not progress, leave=False) as bar:
            for start in range(0, n, self.rows):
                yield slice(start, min(n, start + self.rows))
                bar.update(min(n, start + self.rows) - start)

    def tiles(self, size: int) -> list[slice]:
        """Positions in ``ids``, ``size`` at a time."""
        return [slice(c, min(self.ids.size, c + size)) for c in range(0, self.ids.size, size)]

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        """[rows, tokens, width] in the kind's dtype."""
        block = self.t[self.kind].numpy((rows, self.ids[cols]))
        return block.reshape(rows.stop - rows.start, cols.stop - cols.start, self.width)

    def read_block(self, rows: slice, out: np.ndarray | None = None) -> np.ndarray:
        """[rows, tokens, width] of the whole selection, ``read_tile`` tokens at a time (into ``out``)."""
        if out is None:
            out = np.empty((rows.stop - rows.start, self.ids.size, self.width), self.t.kinds[self.kind].numpy_dtype)
        for cols in self.tiles(self.read_tile):
            out[:, cols] = self.read(rows, cols)
        return out

    def run(self, task: Callable, client, progress: bool, label: str) -> Iterator[tuple[slice, object]]:
        """``(rows, task(self, rows))`` for every block of rows, in order: here, or as tasks on
        ``client`` (this plan sent to each worker once)."""
        if client is None:
            for rows in self.row_blocks(progress, label):
                yield rows, task(self, rows)
            return
        blocks = [slice(start, min(len(self.t), start + self.rows)) for start in range(0, len(self.t), self.rows)]
        plan = client.scatter(self, broadcast=True)
        futures = client.map(task, [plan] * len(blocks), blocks, pure=False)
        for rows, future in zip(self.row_blocks(progress, label), futures):
            yield rows, future.result()


# -- embeddings: displacement, movement, centroid, freezing, lattice hops -------------------------------


@dataclass
class EmbeddingStats:
    """What one pass over a kind's rows for a token selection measures. See :func:`embedding_stats`."""

    kind: str
    tokens: str  # the token-set name, "all", or "<n> tokens"
    token_ids: np.ndarray  # [tokens]
    table: Table  # per row; columns in embedding_stats' docstring
    freeze_step: np.ndarray  # [tokens] the step each token froze at; -1: it changed at the last row
    hop_histogram: np.ndarray  # [rows, bins] coordinates per bin of lattice hops; see hop_bin_labels

    def freeze_step_counts(self) -> Table:
        """How many tokens froze at each step (``step``, ``tokens``); still-moving tokens are not counted."""
        steps = self.table["step"]
        frozen_at, count = np.unique(self.freeze_step[self.freeze_step >= 0], return_counts=True)
        tokens = np.zeros(steps.size, np.int64)
        tokens[np.searchsorted(steps, frozen_at)] = count
        return {"step": steps, "tokens": tokens}

    @property
    def still_moving(self) -> int:
        """Tokens that changed at the last recorded row."""
        return int(np.count_nonzero(self.freeze_step < 0))

    def hop_bin_labels(self) -> list[str]:
        """Bin 0 counts coordinates that did not move; bin k >= 1 those that moved 2**(k-1) to 2**k - 1 values."""
        return ["0"] + [
            str(lo) if lo == hi else f"{lo}-{hi}"
            for lo, hi in ((2 ** (k - 1), 2**k - 1) for k in range(1, self.hop_histogram.shape[1]))
        ]


def embedding_stats(
    t: Trajectory,
    tokens: Tokens = None,
    *,
    kind: str = "embeddings",
    max_bytes: int = MAX_BYTES,
    progress: bool = False,
    cache: bool = False,
    client=None,
) -> EmbeddingStats:
    """Per-step statistics of ``kind`` (the token embeddings) over ``tokens``, in one streaming pass.

    ``tokens``: a token-set name (``"untrained"``), token ids, or None for every token. Each token's
    vector is taken in float32, as the notebook does (``W.float()``). ``table`` has, per row:

    - ``step``: the training step.
    - ``displacement_max``, ``_mean``, ``_median``: over tokens, of ``||w_row - w_0||``, the distance from
      row 0 (the notebook's verification cell; median as ``torch.median``: for an even count, the lower
      of the two middle values).
    - ``movement_max``, ``_mean``, ``_median``: of ``||w_row - w_row-1||``, the step-to-step movement (NaN at row 0).
    - ``centroid_norm``, ``radius_mean``, ``radius_max``: the norm of the tokens' mean vector, and the mean
      and largest distance of a token from it (the notebook's initialisation cell).
    - ``frozen_fraction``: the fraction of tokens whose vector is bit for bit the previous row's (NaN at row 0).
    - ``hops_mean``, ``hops_max``, ``moved_fraction``: lattice hops, the number of representable values
      (bfloat16: of 65,536 bit patterns, +0 and -0 one value) a coordinate moved since the previous row;
      their mean and maximum over coordinates, and the fraction of coordinates that moved (NaN at row 0).

    ``hop_histogram[row]`` counts coordinates by hops (bins: :meth:`EmbeddingStats.hop_bin_labels`);
    ``freeze_step[i]`` is the step from which token ``token_ids[i]`` never changes again in the recorded
    rows, or -1 if it changed at the last row. With ``cache``, the result is kept in the store (see
    docs/analysis.md) and reused until the store grows. ``client``: a ``dask.distributed`` client to
    run on (default: the current one, if any; module docstring).

    >>> s = embedding_stats(t, "untrained")
    >>> s.table["displacement_max"][-1], s.table["frozen_fraction"][-1]
    """
    label, ids = resolve_tokens(t, tokens, kind)
    if t.kinds[kind].dtype not in LATTICE_DTYPES:
        raise ValueError(
            f"kind {kind!r} has dtype {t.kinds[kind].dtype}; embedding_stats needs one of {LATTICE_DTYPES}"
        )
    args = {"kind": kind, "tokens": label, "ids": _digest(ids.tobytes())}
    compute = lambda: _embedding_pass(t, kind, label, ids, max_bytes, progress, current_client(client))  # noqa: E731
    return _cached(t, "embedding_stats", args, compute, EmbeddingStats) if cache else compute()


def current_client(client=None):
    """The ``dask.distributed`` client an analysis runs on: ``client``, else the current one
    (``distributed.get_client()``) if this process has one, else None (in this process)."""
    if client is not None or "distributed" not in sys.modules:  # no client without distributed imported
        return client
    from distributed import get_client

    try:
        return get_client()
    except ValueError:  # no client
        return None


LATTICE_DTYPES = ("bfloat16", "float16", "float32")
# bit-pattern width -> (unsigned view, signed working type): lattice indices of 16-bit floats fit int32
_LATTICE = {2: (np.uint16, np.int32), 4: (np.uint32, np.int64)}


def lattice_index(values: np.ndarray) -> np.ndarray:
    """An order-preserving integer for each float: consecutive representable values get consecutive
    integers, +0 and -0 both 0 (sign-magnitude bits mapped to a signed integer).

    >>> lattice_index(np.array([-0.0, 0.0, 1.0], ml_dtypes.bfloat16))   # array([0, 0, 16256])
    """
    unsigned, signed = _LATTICE[values.dtype.itemsize]
    sign = signed(1) << (8 * values.dtype.itemsize - 1)
    index = values.view(unsigned).astype(signed)
    negative = index >= sign
    index &= sign - 1  # the magnitude's bits, in place: this runs on every coordinate of every row
    return np.negative(index, out=index, where=negative)


_BIT_LENGTH = np.frexp(np.arange(2**16))[1].astype(np.uint8)  # the bins of hops below 2**16, by table lookup


def hop_bins(hops: np.ndarray) -> np.ndarray:
    """Histogram bin of each hop count: 0 for 0, k for 2**(k-1) <= hops < 2**k (its bit length, exact).

    >>> hop_bins(np.array([0, 1, 2, 3, 4, 65535]))   # array([0, 1, 2, 2, 3, 16])
    """
    if hops.size and hops.max() >= _BIT_LENGTH.size:  # 32-bit kinds
        return np.frexp(hops)[1]
    return _BIT_LENGTH[hops]


def _hop_counts(x: np.ndarray, before: np.ndarray, n_bins: int) -> tuple[np.ndarray, ...]:
    """Per row of a [rows, tokens, width] tile: hops summed, the largest, coordinates moved, histogram."""
    hops = lattice_index(x)
    hops -= lattice_index(before)
    hops = np.abs(hops, out=hops).reshape(len(x), -1)
    histogram = np.stack([np.bincount(row, minlength=n_bins) for row in hop_bins(hops)])
    return hops.sum(axis=1), hops.max(axis=1), np.count_nonzero(hops, axis=1), histogram


def _embedding_pass(
    t: Trajectory, kind: str, label: str, ids: np.ndarray, max_bytes: int, progress: bool, client
) -> EmbeddingStats:
    plan = _Blocks.plan(t, kind, ids, max_bytes)
    dtype, n_rows, n = t.kinds[kind].numpy_dtype, len(t), ids.size
    table = {"step": t.steps, **{c: np.full(n_rows, np.nan) for c in STATS_COLUMNS}}
    histogram = np.zeros((n_rows, _hop_bin_count(dtype)), dtype=np.int64)
    last_change = np.zeros(n, np.int64)  # per token, the last row at which it changed
    task = _embedding_block if client is not None else _EmbeddingBlocks(plan)  # here: row 0 and the previous row kept
    for rows, (columns, changed, histogram[rows]) in plan.run(task, client, progress, label):
        for name, values in columns.items():
            table[name][rows] = values
        touched = changed.any(axis=0)
        last_change[touched] = rows.stop - 1 - np.argmax(changed[::-1, touched], axis=0)
    for name in STEP_COLUMNS:
        table[name][0] = np.nan  # row 0 has no previous row
    histogram[0] = 0
    freeze_step = t.steps[last_change]
    if n_rows > 1:
        freeze_step[last_change == n_rows - 1] = -1
    return EmbeddingStats(kind, label, ids, table, freeze_step, histogram)


def _hop_bin_count(dtype: np.dtype) -> int:
    return 8 * dtype.itemsize + 1


def _embedding_block(plan: _Blocks, rows: slice) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """One block's :func:`_block_stats`, reading row 0 and the row before the block itself (a task
    of its own on a cluster)."""
    first = plan.read_block(slice(0, 1))[0].astype(np.float32)
    previous = plan.read_block(slice(max(rows.start - 1, 0), max(rows.start, 1)))[0]
    block = plan.read_block(rows)
    return _block_stats(block, first, previous, plan.tiles(plan.tile), _hop_bin_count(block.dtype))


class _EmbeddingBlocks:
    """:func:`_embedding_block` in this process, block after block: row 0 and the previous row are
    kept from the blocks before rather than read again, and one block's buffer is reused."""

    def __init__(self, plan: _Blocks):
        width, dtype = plan.width, plan.t.kinds[plan.kind].numpy_dtype
        self.first = np.empty((plan.ids.size, width), np.float32)  # row 0, the displacement's origin
        self.previous = np.empty((plan.ids.size, width), dtype)  # the row before the current block
        self.buffer = np.empty((plan.rows, plan.ids.size, width), dtype)  # never two blocks alive at once

    def __call__(self, plan: _Blocks, rows: slice):
        block = plan.read_block(rows, self.buffer[: rows.stop - rows.start])
        if rows.start == 0:  # row 0 is its own previous row: no movement, no hops
            self.first[:] = block[0]
            self.previous[:] = block[0]
        return _block_stats(block, self.first, self.previous, plan.tiles(plan.tile), _hop_bin_count(block.dtype))


STATS_COLUMNS = (
    "displacement_max",
    "displacement_mean",
    "displacement_median",
    "movement_max",
    "movement_mean",
    "movement_median",
    "centroid_norm",
    "radius_mean",
    "radius_max",
    "frozen_fraction",
    "hops_mean",
    "hops_max",
    "moved_fraction",
)
STEP_COLUMNS = (
    "movement_max",
    "movement_mean",
    "movement_median",
    "frozen_fraction",
    "hops_mean",
    "hops_max",
    "moved_fraction",
)  # the columns that compare a row with the previous one


def _block_stats(
    block: np.ndarray, first: np.ndarray, previous: np.ndarray, tiles: list[slice], n_bins: int
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The table's columns for a [rows, tokens, width] block, which tokens changed at each row, and the
    hop histogram. ``previous`` (the row before the block) is advanced to the block's last row."""
    r, n, width = block.shape
    bits = _LATTICE[block.dtype.itemsize][0]  # compare bit patterns: NaN == NaN, -0 != +0
    displacement, movement = np.empty((r, n), np.float32), np.empty((r, n), np.float32)
    changed = np.empty((r, n), bool)
    sums, histogram = np.zeros((r, width)), np.zeros((r, n_bins), np.int64)
    hop_sum, hop_max, moved = np.zeros(r), np.zeros(r), np.zeros(r)
    for cols in tiles:  # each temporary is dropped as soon as it is used: together they make WORK_BYTES_PER_VALUE
        x = block[:, cols]
        before = np.concatenate([previous[None, cols], x[:-1]])
        changed[:, cols] = np.any(x.view(bits) != before.view(bits), axis=-1)
        tile_sum, tile_max, tile_moved, tile_histogram = _hop_counts(x, before, n_bins)
        hop_sum += tile_sum
        hop_max = np.maximum(hop_max, tile_max)
        moved += tile_moved
        histogram += tile_histogram
        f = x.astype(np.float32)
        displacement[:, cols] = np.linalg.norm(f - first[cols], axis=-1)
        moved_by = before.astype(np.float32)
        moved_by -= f
        movement[:, cols] = np.linalg.norm(moved_by, axis=-1)
        sums += f.sum(axis=1, dtype=np.float64)
        previous[cols] = x[-1]
    centroid = (sums / n).astype(np.float32)
    radius_sum, radius_max = np.zeros(r), np.zeros(r)
    for cols in tiles:  # a second pass over the block: the radii need the centroid of every token
        radii = np.linalg.norm(block[:, cols].astype(np.float32) - centroid[:, None, :], axis=-1)
        radius_sum += radii.sum(axis=1, dtype=np.float64)
        radius_max = np.maximum(radius_max, radii.max(axis=1))
    columns = {
        "displacement_max": displacement.max(axis=1),
        "displacement_mean": displacement.mean(axis=1, dtype=np.float64),
        "displacement_median": _lower_median(displacement),
        "movement_max": movement.max(axis=1),
        "movement_mean": movement.mean(axis=1, dtype=np.float64),
        "movement_median": _lower_median(movement),
        "centroid_norm": np.linalg.norm(centroid, axis=1),
        "radius_mean": radius_sum / n,
        "radius_max": radius_max,
        "frozen_fraction": np.count_nonzero(~changed, axis=1) / n,
        "hops_mean": hop_sum / (n * width),
        "hops_max": hop_max,
        "moved_fraction": moved / (n * width),
    }
    return columns, changed, histogram


def _lower_median(values: np.ndarray) -> np.ndarray:
    """Per row, the median as ``torch.median`` takes it: the lower middle value for an even count."""
    k = (values.shape[1] - 1) // 2
    return np.partition(values, k, axis=1)[:, k].astype(np.float64)


# -- optimizer state, loss and learning rate ------------------------------------------------------------

MOMENT_KINDS = ("grads", "momentum", "variance")


def moment_norms(
    t: Trajectory,
    tokens: Tokens = None,
    *,
    kinds: Sequence[str] | None = None,
    max_bytes: int = MAX_BYTES,
    progress: bool = False,
    cache: bool = False,
    client=None,
) -> Table:
    """Per row, the L2 norm over ``tokens`` of each kind (default: the gradient and Adam's two moments,
    those of ``grads``, ``momentum``, ``variance`` the store has with a token axis), accumulated in float64 so that
    tiny second moments do not underflow. One column per kind, after ``step``. ``client``: a
    ``dask.distributed`` client to run on (default: the current one, if any; module docstring).

    >>> moment_norms(t, "untrained")["momentum"]
    """
    if kinds is None:
        kinds = [k for k in MOMENT_KINDS if k in t.kinds and t.kinds[k].dims[:1] == ("token",)]
    if not kinds:
        raise ValueError(
            f"no gradient or Adam moment kinds ({', '.join(MOMENT_KINDS)}) in this trajectory; "
            f"it records {list(t.kinds)}"
        )
    label, ids = resolve_tokens(t, tokens, kinds[0])

    def compute() -> Table:
        table, on = {"step": t.steps}, current_client(client)
        for kind in kinds:
            plan = _Blocks.plan(t, kind, resolve_tokens(t, ids, kind)[1], max_bytes)
            squares = np.zeros(len(t))
            for rows, block_squares in plan.run(_squares, on, progress, label):
                squares[rows] = block_squares
            table[kind] = np.sqrt(squares)
        return table

    args = {"kinds": kinds, "tokens": label, "ids": _digest(ids.tobytes())}
    return _cached(t, "moment_norms", args, compute, dict) if cache else compute()


def _squares(plan: _Blocks, rows: slice) -> np.ndarray:
    """Per row of the block, the sum of squares of the selection, in float64."""
    squares = np.zeros(rows.stop - rows.start)
    for cols in plan.tiles(plan.read_tile):  # float64 copies: as many bytes again
        x = plan.read(rows, cols).astype(np.float64).reshape(rows.stop - rows.start, -1)
        squares += np.einsum("ij,ij->i", x, x)
    return squares


def curves(t: Trajectory) -> Table:
    """Every per-step scalar kind (``losses``, ``learning_rate``, ``grad_norm``, ...) as float64, after ``step``.

    >>> c = curves(t); c["losses"][1], c["learning_rate"][-1]
    """
    table = {"step": t.steps}
    for name, spec in t.kinds.items():
        if spec.shape == ():
            table[name] = np.asarray(t[name].numpy(), dtype=np.float64).reshape(len(t))
    return table


def largest_jump(
    values: np.ndarray, steps: np.ndarray, *, skip: int = 2, factor: float = 4.0, floor: float = 0.1
) -> tuple[int, float] | None:
    """(step, ratio) of a kick, such as a resumed run's at its seam: the row after the first ``skip``
    (the start of training) whose value grew most, among rows that grew at least ``factor``-fold
    from the previous row to at least ``floor`` times the largest value after the start (so that
    noise among nearly frozen tokens, tiny numbers whose ratios are large, is not a kick). None if
    no row qualifies.

    >>> largest_jump(s.table["movement_mean"], s.table["step"])    # e.g. (100, 35.2) for WB1+WB3
    """
    values = np.asarray(values, np.float64)
    rows = np.arange(max(skip, 1), values.size)
    if rows.size == 0 or np.all(np.isnan(values[rows])):
        return None
    before, after = values[rows - 1], values[rows]
    with np.errstate(divide="ignore", invalid="ignore"):
        grew = (after >= factor * before) & (after >= floor * np.nanmax(values[rows])) & (before > 0)
    if not grew.any():
        return None
    at = rows[grew][np.argmax((after - before)[grew])]
    return int(steps[at]), float(values[at] / values[at - 1])


# -- caching results in the store ----------------------------------------------------------------------


def _digest(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:16]


def _cached(t: Trajectory, name: str, args: dict, compute: Callable, result_type: type):
    """``compute()``, or its earlier result kept at ``analysis/<name>-<digest of args>.json`` if that was
    computed over as many rows as ``t`` has (rows are only ever appended, never changed). A store
    that cannot be written (read-only, remote without credentials) simply is not cached into."""
    key = f"{CACHE_PREFIX}/{name}-{_digest(json.dumps(args, sort_keys=True))}.json"
    try:  # a damaged or foreign cache entry is recomputed and replaced
        document = json_documents.read_json(t.store, key)
        if isinstance(document, dict) and document.get("version") == CACHE_VERSION and document.get("rows") == len(t):
            result = _decode(document["result"])
            if isinstance(result, dict):
                return result_type(**result) if result_type is not dict else result
    except (FormatError, KeyError, TypeError, ValueError):
        pass
    result = compute()
    document = {
        "version": CACHE_VERSION,
        "rows": len(t),
        "args": args,
        "result": _encode(asdict(result) if result_type is not dict else result),
    }
    try:
        json_documents.write_json(t.store.with_read_only(False), key, document)
    except (
        OSError,
        NotImplementedError,
        StorageError,
    ):  # read-only media or bucket; a store that cannot reopen writable
        pass
    return result


def _encode(value):
    """JSON for dicts of arrays: arrays as {"ndarray": nested lists with NaN as null, "dtype": ...}."""
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        data = np.where(np.isnan(value), None, value.astype(object)) if value.dtype.kind == "f" else value
        return {"ndarray": data.tolist(), "dtype": value.dtype.str}
    return value


def _decode(value):
    """:func:`_encode` undone; a cache entry is a store's document: only numbers come out of it."""
    if isinstance(value, dict) and set(value) == {"ndarray", "dtype"}:
        dtype = np.dtype(value["dtype"])
        if dtype.kind not in "biuf" or dtype.itemsize > 8:
            raise ValueError(f"a cached array of dtype {dtype} is not one an analysis writes")
        return np.array(value["ndarray"], dtype=dtype)
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    return value
