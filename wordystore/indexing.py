"""numpy indexing on a lazily read array, in two stages.

An index expression is split into (1) an orthogonal *fetch*: per axis, the smallest slice or the
sorted unique positions that the expression touches, which zarr reads; and (2) a *local* index
that numpy then applies to the fetched block, with positions remapped into it. Because stage 2 is
numpy itself, the result follows numpy's rules exactly (negative steps, repeated or unsorted ids,
several integer arrays broadcasting together), while stage 1 reads only what is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch



@dataclass
class Plan:
    fetch: tuple  # per axis: a slice with step >= 1, or a sorted unique int64 array
    local: tuple  # numpy index into the fetched block
    fetch_shape: tuple[int, ...]


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


def _axis_plan(index, length: int, axis_name: str, resolve_name: Callable[[str, str], np.ndarray],
               only_advanced: bool = False):
    """(fetch, local) for one axis. ``only_advanced``: this is the expression's one advanced index
    (no other array or int), so a sorted unique array needs no second, numpy-side gather."""
    if isinstance(index, str):
        index = resolve_name(index, axis_name)
    if isinstance(index, (bool, np.bool_)):
        raise TypeError(f"a bare bool is not an index on axis '{axis_name}'; use a boolean mask of length {length}")
    if isinstance(index, (int, np.integer)) or (isinstance(index, torch.Tensor) and index.ndim == 0
                                                and not index.is_floating_point() and index.dtype != torch.bool):
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
            raise IndexError(f"boolean mask of shape {array.shape} does not match axis '{axis_name}' of length {length}")
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


def plan(index, shape: tuple[int, ...], axis_names: tuple[str, ...], resolve_name) -> Plan:
    """Split ``index`` on an array of ``shape`` into what to read and how to finish in numpy."""
    if not isinstance(index, tuple):
        index = (index,)
    if sum(1 for i in index if i is Ellipsis) > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    if any(i is None for i in index):
        raise IndexError("np.newaxis / None is not supported in a trajectory index; add axes to the result instead")
    if Ellipsis in [i for i in index if not isinstance(i, (np.ndarray, torch.Tensor))]:
        at = next(n for n, i in enumerate(index) if i is Ellipsis)
        fill = len(shape) - (len(index) - 1)
        index = index[:at] + (slice(None),) * fill + index[at + 1 :]
    if len(index) > len(shape):
        raise IndexError(f"too many indices: {len(index)} given for {len(shape)} axes {axis_names}")
    index = index + (slice(None),) * (len(shape) - len(index))
    basic = [isinstance(i, slice) for i in index]
    advanced = [not b and not isinstance(i, (int, np.integer)) for i, b in zip(index, basic)]
    single = sum(advanced) == 1 and sum(basic) == len(index) - 1
    fetch, local = [], []
    for i, length, name, adv in zip(index, shape, axis_names, advanced):
        f, loc = _axis_plan(i, length, name, resolve_name, only_advanced=single and adv)
        fetch.append(f)
        local.append(loc)
    fetch_shape = tuple(len(range(*f.indices(n))) if isinstance(f, slice) else len(f) for f, n in zip(fetch, shape))
    return Plan(tuple(fetch), tuple(local), fetch_shape)


def finish(block: np.ndarray, plan: Plan) -> np.ndarray:
    """Apply the local index (skipped when it would select the whole block as is)."""
    if all(isinstance(loc, slice) and loc == slice(None) for loc in plan.local):
        return block
    return np.asarray(block[plan.local])  # numpy returns a scalar, not a 0-d array, for all-int indices
