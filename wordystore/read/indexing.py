"""numpy indexing on a lazily read array, in two stages.

An index expression is split into (1) an orthogonal *fetch*: per axis, the smallest slice or the
sorted unique positions that the expression touches, which zarr reads; and (2) a *local* index
that numpy then applies to the fetched block, with positions remapped into it. Because stage 2 is
numpy itself, the result follows numpy's rules exactly (negative steps, repeated or unsorted ids,
several integer arrays broadcasting together), while stage 1 reads only what is needed.

``.loc`` indexes by training step instead of row: :func:`step_rows` turns its step labels into
rows first, then the same planner runs. Everything here is pure (no I/O).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

INT64_MIN, INT64_MAX = int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max)


@dataclass
class Plan:
    fetch: tuple  # per axis: a slice with step >= 1, or a sorted unique int64 array
    local: tuple  # numpy index into the fetched block
    fetch_shape: tuple[int, ...]
    orthogonal: bool = False  # apply ``local`` one axis at a time


def _as_array(index) -> np.ndarray | None:
    """Integer or boolean arrays (numpy, torch, lists) as numpy; None for anything else."""
    if isinstance(index, torch.Tensor):
        return index.detach().cpu().numpy()
    if isinstance(index, np.ndarray):
        return index
    if isinstance(index, (list, tuple, range)):
        array = np.asarray(index)
        if array.dtype == object or (array.size and array.dtype.kind not in "biu"):
            raise TypeError(f"index list must hold ints or bools, got {index!r}")
        return array.astype(np.int64) if array.size == 0 else array
    return None


def _axis_plan(
    index, length: int, axis_name: str, resolve_name: Callable[[str, str], np.ndarray], only_advanced: bool = False
):
    """(fetch, local) for one axis. ``only_advanced``: this is the expression's one advanced index
    (no other array or int), so a sorted unique array needs no second, numpy-side gather."""
    if isinstance(index, str):
        index = resolve_name(index, axis_name)
    if isinstance(index, (bool, np.bool_)):
        raise TypeError(f"a bare bool is not an index on axis '{axis_name}'; use a boolean mask of length {length}")
    if isinstance(index, (int, np.integer)) or (
        isinstance(index, torch.Tensor)
        and index.ndim == 0
        and not index.is_floating_point()
        and index.dtype != torch.bool
    ):
        i = int(index)
        if not -length <= i < length:
            raise IndexError(f"index {i} is out of range for axis '{axis_name}' of length {length}")
        i %= length
        return slice(i, i + 1), 0
    if isinstance(index, slice):
        start, stop, step = index.indices(length)
        positions = range(start, stop, step)
        if len(positions) == 0:
            return slice(0, 0), slice(None)
        if step > 0:
            return slice(start, positions[-1] + 1, step), slice(None)
        return slice(positions[-1], start + 1, -step), slice(None, None, -1)
    array = _as_array(index)
    if array is None:
        raise TypeError(
            f"cannot index axis '{axis_name}' with {type(index).__name__}; expected an int, slice, "
            "integer array, boolean mask or (on the token axis) a token-set name"
        )
    if array.dtype == bool:
        if array.ndim != 1 or array.shape[0] != length:
            raise IndexError(
                f"boolean mask of shape {array.shape} does not match axis '{axis_name}' of length {length}"
            )
        array = np.flatnonzero(array)
    elif array.dtype.kind not in "iu":
        raise TypeError(f"index array for axis '{axis_name}' must be integer or boolean, got dtype {array.dtype}")
    array = array.astype(np.int64)
    if array.size and (array.min() < -length or array.max() >= length):
        bad = array[(array < -length) | (array >= length)][0]
        raise IndexError(f"index {bad} is out of range for axis '{axis_name}' of length {length}")
    array = np.where(array < 0, array + length, array)
    if only_advanced and array.ndim == 1 and np.all(array[1:] > array[:-1]):  # e.g. a token set
        return array, slice(None)
    unique = np.unique(array)
    return unique, np.searchsorted(unique, array)


def full_index(index, axis_names: tuple[str, ...]) -> tuple:
    """``index`` as a tuple of one entry per axis: the ellipsis expanded, missing axes as ``:``.

    An ellipsis that stands for no axis at all is kept: numpy still counts it as parting the
    integer-array indices on either side (``a[:, 0, ..., [1]]`` moves the broadcast axis first).
    """
    if not isinstance(index, tuple):
        index = (index,)
    if sum(1 for i in index if i is Ellipsis) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    if any(i is None for i in index):
        raise IndexError("np.newaxis / None is not supported in a trajectory index; add axes to the result instead")
    given = len(index) - any(i is Ellipsis for i in index)
    if given > len(axis_names):
        raise IndexError(f"too many indices: {given} given for {len(axis_names)} axes {axis_names}")
    if given < len(index):
        at = next(n for n, i in enumerate(index) if i is Ellipsis)
        fill = len(axis_names) - given
        return index[:at] + ((slice(None),) * fill or (Ellipsis,)) + index[at + 1 :]
    return index + (slice(None),) * (len(axis_names) - given)


def plan(index, shape: tuple[int, ...], axis_names: tuple[str, ...], resolve_name, orthogonal: bool = False) -> Plan:
    """Split ``index`` on an array of ``shape`` into what to read and how to finish in numpy.

    ``orthogonal``: each axis' index selects along that axis alone (zarr's ``oindex``), instead of
    numpy's rule that index arrays broadcast together.
    """
    index = full_index(index, axis_names)
    if orthogonal:  # numpy's rule on array indices parted by an ellipsis does not apply
        index = tuple(i for i in index if i is not Ellipsis)
    per_axis = [i for i in index if i is not Ellipsis]
    basic = [isinstance(i, slice) for i in per_axis]
    advanced = [not b and not isinstance(i, (int, np.integer)) for i, b in zip(per_axis, basic)]
    single = orthogonal or (sum(advanced) == 1 and sum(basic) == len(per_axis) - 1)
    fetch, local = [], []
    axes = iter(zip(shape, axis_names, advanced))
    for i in index:
        if i is Ellipsis:  # standing for no axis: kept for numpy's rule on parted array indices
            local.append(Ellipsis)
            continue
        length, name, adv = next(axes)
        f, loc = _axis_plan(i, length, name, resolve_name, only_advanced=single and adv)
        fetch.append(f)
        local.append(loc)
    fetch_shape = tuple(len(range(*f.indices(n))) if isinstance(f, slice) else len(f) for f, n in zip(fetch, shape))
    return Plan(tuple(fetch), tuple(local), fetch_shape, orthogonal)


def finish(block: np.ndarray, plan: Plan) -> np.ndarray:
    """Apply the local index (skipped when it would select the whole block as is)."""
    if all(isinstance(loc, slice) and loc == slice(None) for loc in plan.local):
        return block
    if plan.orthogonal:  # each axis alone, the last first, so earlier axes keep their place
        for axis in reversed(range(len(plan.local))):
            if not (isinstance(plan.local[axis], slice) and plan.local[axis] == slice(None)):
                block = block[(slice(None),) * axis + (plan.local[axis],)]
        return np.asarray(block)
    return np.asarray(block[plan.local])  # numpy returns a scalar, not a 0-d array, for all-int indices


# -- .loc: training step labels to rows ------------------------------------------------------------


def step_rows(steps: np.ndarray, label) -> int | slice | np.ndarray:
    """The rows that ``.loc[label]`` selects, given the trajectory's strictly increasing ``steps``.

    As pandas' ``.loc`` on a sorted integer index (and xarray's ``.sel``):

    - an int: the row recording that step (``KeyError`` if none); the axis is dropped;
    - a slice ``a:b:k``: the rows whose step lies in ``[a, b]``, both ends included, either end
      free to fall between or outside recorded steps. ``k`` counts rows, not steps; a negative
      ``k`` walks down from ``a`` to ``b``, so ``loc[::-1]`` reverses and ``loc[200:100:-1]``
      is steps 200 down to 100. The result is a slice, so it combines with the other axes'
      indices as a positional slice does;
    - a list or array of ints: those steps' rows, in that order (``KeyError`` naming any step
      not recorded);
    - a boolean mask over rows, unchanged.

    >>> step_rows(np.array([0, 5, 10, 15]), slice(5, 12))
    slice(1, 3, 1)
    >>> step_rows(np.array([0, 5, 10, 15]), [15, 0])
    array([3, 0])
    """
    if isinstance(label, slice):
        return _step_slice(steps, label)
    if isinstance(label, torch.Tensor):
        label = label.detach().cpu().numpy()
    if _is_int(label):
        label = int(label)
        row = _search(steps, label, "left")
        if row == len(steps) or int(steps[row]) != label:
            raise KeyError(_not_recorded([label], steps))
        return row
    array = _label_array(label, steps)
    if array.dtype == bool:
        return array
    rows = np.searchsorted(steps, array)
    found = (rows < len(steps)) & (steps[np.minimum(rows, len(steps) - 1)] == array) if len(steps) else array != array
    if not np.all(found):
        raise KeyError(_not_recorded(array[~found].tolist(), steps))
    return rows


def _label_array(label, steps: np.ndarray) -> np.ndarray:
    """A list or array of ``.loc`` labels as int64 steps (or a bool mask); steps past int64 are not recorded."""
    if isinstance(label, (list, tuple, range)):
        if all(_is_int(v) for v in label):  # not np.asarray: it would make [0, 2**63] float64
            values = [int(v) for v in label]
            beyond = [v for v in values if not INT64_MIN <= v <= INT64_MAX]
            if beyond:
                raise KeyError(_not_recorded(beyond, steps))
            return np.array(values, dtype=np.int64)
        if all(isinstance(v, (bool, np.bool_)) for v in label):
            return np.array(label, dtype=bool)
    elif isinstance(label, np.ndarray) and label.dtype.kind in "biu":
        if label.dtype.kind == "u" and label.size and label.max() > INT64_MAX:
            raise KeyError(_not_recorded(label[label > INT64_MAX].tolist(), steps))
        return label if label.dtype == bool else label.astype(np.int64)
    raise TypeError(
        f"loc takes training step numbers: an int, a slice of ints, a list or array of ints, or a boolean "
        f"mask over rows; got {type(label).__name__} {label!r}"
    )


def _step_slice(steps: np.ndarray, label: slice) -> slice:
    for part, value in (("start", label.start), ("stop", label.stop), ("step", label.step)):
        if value is not None and not _is_int(value):
            raise TypeError(
                f"loc slice {part} must be an int or None, got {type(value).__name__} {value!r}; "
                f"loc[a:b:k] selects training steps a..b (inclusive), every k-th row"
            )
    stride = 1 if label.step is None else int(label.step)
    if stride == 0:
        raise ValueError("slice step cannot be zero")  # numpy's and pandas' words for [::0]
    n = len(steps)
    if stride > 0:
        first = 0 if label.start is None else _search(steps, int(label.start), "left")
        stop = n if label.stop is None else _search(steps, int(label.stop), "right")
        return slice(first, max(first, stop), stride)
    # walking down: from the last row at or below ``start`` to the first row at or above ``stop``
    first = n - 1 if label.start is None else _search(steps, int(label.start), "right") - 1
    last = 0 if label.stop is None else _search(steps, int(label.stop), "left")
    if first < last:
        return slice(0, 0, 1)
    return slice(first, last - 1 if last > 0 else None, stride)


def _is_int(value) -> bool:
    """A Python or numpy int, or a 0-d integer array or tensor; not a bool."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if value.ndim != 0:
            return False
        value = value.item()
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _search(steps: np.ndarray, step: int, side: str) -> int:
    """``np.searchsorted`` for any Python int, int64 or not."""
    if step > INT64_MAX:
        return len(steps)
    if step < INT64_MIN:
        return 0
    return int(np.searchsorted(steps, np.int64(step), side))


def _not_recorded(missing: list[int], steps: np.ndarray) -> str:
    recorded = f"{len(steps)} steps, {steps[0]}..{steps[-1]}" if len(steps) else "no steps yet"
    return f"training step(s) {missing[:5]} not recorded; this trajectory records {recorded}"
