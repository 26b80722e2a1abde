"""Index expressions, positional and by training step (``.loc``), against plain numpy.

The planner (``wordystore.read.indexing``) is pure, so most expressions run against it with numpy doing
the orthogonal read that zarr does for a store: 10,000 random expressions in a few seconds. A few
hundred more go through a real store on disk, and ``.loc`` is checked against a reference written
from its definition (pandas' ``.loc`` on a sorted integer index): the rows whose step lies in
``[start, stop]``, both ends included, then every k-th of them, walking down for a negative k.
"""

import random

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import wordystore
from wordystore import Kind, trajectory
from wordystore.format.kinds import numpy_to_torch
from wordystore.read import indexing

AXES = ("step", "token", "dim")


def token_sets(vocab: int) -> dict[str, np.ndarray]:
    return {"even": np.arange(0, vocab, 2), "tail": np.arange(vocab // 2, vocab)}


# -- references --------------------------------------------------------------------------------------


def as_numpy_index(index):
    """The same index for numpy: torch tensors as arrays. Token-set names are resolved by the caller."""
    return tuple(i.numpy() if isinstance(i, torch.Tensor) else i for i in index)


def loc_reference(steps: np.ndarray, label):
    """The rows ``.loc[label]`` means, from its definition, with no searchsorted: a list of rows for
    slices and lists (slices keep the axis, as a list does), a bare row for an int."""
    if isinstance(label, slice):
        k = 1 if label.step is None else label.step
        low, high = (label.start, label.stop) if k > 0 else (label.stop, label.start)
        rows = [r for r, s in enumerate(steps.tolist()) if (low is None or s >= low) and (high is None or s <= high)]
        return rows[::k]
    if isinstance(label, np.ndarray) and label.dtype == bool:
        return label
    where = {s: r for r, s in enumerate(steps.tolist())}
    if isinstance(label, list):
        return [where[s] for s in label]
    return where[label]


def loc_expected(ref: np.ndarray, steps: np.ndarray, label, rest: tuple):
    rows = loc_reference(steps, label)
    if isinstance(label, slice):  # a slice selects orthogonally to the other axes' arrays
        return ref[np.asarray(rows, dtype=np.int64)][(slice(None), *as_numpy_index(rest))]
    return ref[(np.asarray(rows, dtype=np.int64) if isinstance(rows, list) else rows, *as_numpy_index(rest))]


def read_orthogonal(array: np.ndarray, fetch: tuple) -> np.ndarray:
    """What zarr's orthogonal selection returns, in numpy: each axis' slice or positions on its own."""
    for axis, f in enumerate(fetch):
        array = array[(slice(None),) * axis + (f,)]
    return array


def plan_and_read(ref: np.ndarray, index, sets: dict[str, np.ndarray]) -> np.ndarray:
    def resolve(name, axis):
        if axis != "token":
            raise IndexError(f"token-set name {name!r} used on axis '{axis}'")
        return sets[name]

    plan = indexing.plan(index, ref.shape, AXES, resolve)
    return indexing.finish(read_orthogonal(ref, plan.fetch), plan)


# -- random expressions ---------------------------------------------------------------------------------
# Drawn from a hypothesis-controlled ``random.Random`` (``st.randoms``): cheap enough for thousands of
# expressions per second, and hypothesis still replays and shrinks a failing one.


def axis_index(r: random.Random, length: int, axis: str):
    """One axis' index, in every form a user may write it."""
    form = r.choice(
        [
            "int",
            "numpy int",
            "torch int",
            "slice",
            "list",
            "array",
            "torch array",
            "mask",
            "torch mask",
            "name" if axis == "token" else "slice",
        ]
    )
    if form == "name":
        return r.choice(["even", "tail"])
    if form.endswith("int"):
        i = r.randint(-length, length - 1) if length else 0
        return {"int": i, "numpy int": np.int64(i), "torch int": torch.tensor(i)}[form]
    if form == "slice":
        return slice(
            *(r.choice([None, r.randint(-length - 2, length + 2)]) for _ in range(2)),
            r.choice([None, r.choice([-4, -3, -2, -1, 1, 2, 3, 4])]),
        )
    if form.endswith("mask"):
        mask = np.array([r.random() < 0.5 for _ in range(length)], dtype=bool)
        return torch.from_numpy(mask) if form == "torch mask" else mask
    ids = [r.randint(-length, length - 1) for _ in range(r.randint(0, 5))] if length else []
    return {"list": ids, "array": np.array(ids, dtype=np.int64), "torch array": torch.tensor(ids, dtype=torch.long)}[
        form
    ]


def positional_index(r: random.Random, shape: tuple[int, ...]) -> tuple:
    """Indices for the first few axes, or with an ellipsis standing for the axes between."""
    given = r.randint(0, len(shape))
    at = r.choice([None, r.randint(0, given)])  # where the ellipsis goes, if any
    axes = list(range(given)) if at is None else [*range(at), *range(len(shape) - (given - at), len(shape))]
    index = [axis_index(r, shape[axis], AXES[axis]) for axis in axes]
    if at is not None:
        index.insert(at, Ellipsis)
    return tuple(index)


def step_label(r: random.Random, steps: np.ndarray):
    """A ``.loc`` label: recorded steps, steps between and beyond them, slices, lists, masks."""
    recorded = steps.tolist() or [0]
    form = r.choice(["int", "slice", "slice", "list", "mask"])
    if form == "int":
        return r.choice(recorded)
    if form == "slice":
        near = [None, *(r.randint(min(recorded) - 3, max(recorded) + 3) for _ in range(2))]
        return slice(r.choice(near), r.choice(near), r.choice([None, -4, -3, -2, -1, 1, 2, 3, 4]))
    if form == "mask":
        return np.array([r.random() < 0.5 for _ in steps], dtype=bool)
    return [r.choice(recorded) for _ in range(r.randint(0, 4))] if len(steps) else []


def trajectory_arrays(r: random.Random) -> tuple[np.ndarray, np.ndarray]:
    """A small reference [step, token, dim] array and its strictly increasing training steps."""
    shape = (r.randint(0, 7), r.randint(1, 9), r.randint(1, 3))
    steps = np.array(sorted(r.sample(range(60), shape[0])), dtype=np.int64)
    return np.arange(np.prod(shape), dtype=np.int64).reshape(shape), steps


def bits(x) -> np.ndarray:
    """``x`` as numpy, bfloat16 as its int16 bit patterns (so that a NaN equals itself)."""
    if isinstance(x, torch.Tensor):
        return (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).numpy()
    x = np.asarray(x)
    return x.view(np.int16) if x.dtype == ml_dtypes.bfloat16 else x


def same(got, expected) -> bool:
    got, expected = bits(got), bits(expected)
    return got.shape == expected.shape and np.array_equal(got, expected)


def check(expected_fn, got_fn):
    """``got_fn()`` equals ``expected_fn()`` bit for bit, or raises the error the reference raises."""
    try:
        expected = expected_fn()
    except (IndexError, KeyError) as exc:  # integer arrays that do not broadcast; a step not recorded
        with pytest.raises(type(exc)):
            got_fn()
        return
    assert same(got_fn(), expected)


# -- 10,000 expressions against the planner -----------------------------------------------------------

EXPRESSIONS_PER_EXAMPLE = 25


@settings(max_examples=400, deadline=None)  # 400 x 25 = 10,000 expressions, in a few seconds
@given(r=st.randoms(use_true_random=False))
def test_ten_thousand_index_expressions_match_numpy(r):
    ref, steps = trajectory_arrays(r)
    sets = token_sets(ref.shape[1])

    def named(index):
        return tuple(sets[i] if isinstance(i, str) else i for i in index)

    for _ in range(EXPRESSIONS_PER_EXAMPLE):
        if r.random() < 0.5:
            index = positional_index(r, ref.shape)
            check(lambda: ref[named(as_numpy_index(index))], lambda: plan_and_read(ref, index, sets))
        else:
            label = step_label(r, steps)
            rest = named(axis_index(r, n, axis) for n, axis in zip(ref.shape[1:], AXES[1:]))
            check(
                lambda: loc_expected(ref, steps, label, rest),
                lambda: plan_and_read(ref, (indexing.step_rows(steps, label), *rest), sets),
            )


# -- the same through a real store ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A small store of random bfloat16 bit patterns (NaNs, infinities, -0 included), irregular steps."""
    rng = np.random.default_rng(7)
    ref = rng.integers(0, 2**16, size=(11, 9, 3), dtype=np.uint16).view(ml_dtypes.bfloat16)
    steps = np.array([0, 1, 2, 5, 10, 11, 20, 30, 31, 32, 50])
    path = tmp_path_factory.mktemp("indexing") / "t.zarr"
    kinds = {"emb": Kind((9, 3), "bfloat16", ("token", "dim"))}
    with wordystore.create(path, kinds, token_sets=token_sets(9), block_rows=4, chunk_rows=8) as w:
        for row, step in enumerate(steps):
            w.append(int(step), emb=numpy_to_torch(ref[row]))
    return trajectory.open(path), ref, steps


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(r=st.randoms(use_true_random=False))
def test_store_reads_match_numpy_positionally_and_by_step(store, r):
    t, ref, steps = store
    sets = t.token_sets

    def named(index):
        return tuple(sets[i] if isinstance(i, str) else i for i in as_numpy_index(index))

    for _ in range(5):
        index = positional_index(r, ref.shape)
        check(lambda: ref[named(index)], lambda: t.emb[index])
        label = step_label(r, steps)
        rest = tuple(axis_index(r, n, axis) for n, axis in zip(ref.shape[1:], AXES[1:]))
        check(lambda: loc_expected(ref, steps, label, named(rest)), lambda: t.emb.loc[(label, *rest)])


# -- .loc edge cases ---------------------------------------------------------------------------------


def test_loc_negative_stride_walks_down_as_pandas(store):
    t, ref, steps = store  # steps 0 1 2 5 10 11 20 30 31 32 50
    assert same(t.emb.loc[::-5], ref[::-5])  # rows 10, 5, 0: steps 50, 11, 0
    assert same(t.emb.loc[::-1], ref[::-1])
    assert same(t.emb.loc[31:5:-2], ref[[8, 6, 4]])  # steps 31, 20, 10: from 31 down to 5, every 2nd row
    assert same(t.emb.loc[5:31:-1], ref[:0])  # pandas: walking down from 5 never reaches 31
    assert same(t.emb.loc[0:50:3], ref[::3])  # the stride counts rows, as pandas'


def test_loc_refuses_or_handles_what_positional_indexing_does(store):
    t, ref, _ = store
    with pytest.raises(ValueError, match="slice step cannot be zero"):
        t.emb.loc[::0]
    with pytest.raises(ValueError, match="slice step cannot be zero"):
        t.emb[::0]
    assert t.emb.loc[[]].shape == t.emb[[]].shape == (0, 9, 3)
    assert same(t.emb.loc[[], 2:], ref[[], 2:]) and same(t.emb.loc[[], 0], ref[[], 0])
    assert same(t.emb.loc[()], ref) and same(t.emb.loc[..., 1], ref[..., 1])
    assert same(t.emb.loc[torch.tensor([50, 0])], ref[[10, 0]])


@pytest.mark.parametrize(
    "label, error, message",
    [
        (slice("a", "b"), TypeError, r"loc slice start must be an int or None, got str 'a'"),
        (slice(1.5, 3), TypeError, "got float 1.5"),
        ("a", TypeError, "loc takes training step numbers"),
        (5.0, TypeError, "got float 5.0"),
        (True, TypeError, "got bool True"),
        ([0, "a"], TypeError, "loc takes training step numbers"),
        (
            10**30,
            KeyError,
            r"training step\(s\) \[1000000000000000000000000000000\] not recorded; "
            r"this trajectory records 11 steps, 0\.\.50",
        ),
        ([0, 2**63], KeyError, r"\[9223372036854775808\] not recorded"),
        (3, KeyError, r"training step\(s\) \[3\] not recorded"),
        ([0, 3, 4], KeyError, r"\[3, 4\] not recorded"),
        (-1, KeyError, r"\[-1\] not recorded"),  # a label, not a position from the end
    ],
)
def test_loc_refuses_bad_labels_clearly(store, label, error, message):
    t, _, _ = store
    with pytest.raises(error, match=message):
        t.emb.loc[label]


def test_loc_slices_with_huge_bounds_select_by_value(store):
    t, ref, _ = store
    assert same(t.emb.loc[-(10**30) : 10**30], ref)
    assert same(t.emb.loc[10**30 :], ref[:0])


def test_step_rows_is_a_slice_for_slices_so_other_axes_index_orthogonally():
    steps = np.array([0, 5, 10, 15])
    assert indexing.step_rows(steps, slice(5, 12)) == slice(1, 3, 1)
    assert indexing.step_rows(steps, slice(None, None, -1)) == slice(3, None, -1)
    assert indexing.step_rows(steps, 15) == 3
    np.testing.assert_array_equal(indexing.step_rows(steps, [15, 0]), [3, 0])
    with pytest.raises(KeyError, match="records no steps yet"):
        indexing.step_rows(np.zeros(0, np.int64), 0)
