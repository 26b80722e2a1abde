"""Joining runs along the step axis, e.g. WB1 (steps 0-100) and WB3 (resumed at 100, to 200).

The result is an ordinary trajectory whose metadata lists its segments: each source's path, config,
and the rows and steps it contributed, so the seams stay visible (``t.segments``). The runs are
joined in the order of their first recorded step, whatever order they are given in. Where a later
run repeats steps an earlier one recorded (a resumed run records its starting state again), the
earlier run's rows are kept and the repeats are dropped and counted. A run that would add no step
at all (it starts with or lies within an earlier one) is refused: that is two recordings of the
same steps, not a run and its continuation.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from wordystore.read import trajectory
from wordystore.read.trajectory import Trajectory
from wordystore.store.storage import describe, local_root
from wordystore.write.start import create_whole


def stitch(sources, out, *, overwrite=False, progress=True) -> Trajectory:
    """Join a run and its continuations ``sources`` into a new trajectory ``out``.

    Every source is checked before ``out`` is created (see :func:`check_sources`: the same kinds,
    each source going on past the steps before it); rows are copied a tile at a time straight into
    the new store's main tier. A step a source repeats from the one before it (the seam of a
    resumed run) is taken from the earlier source.

    Parameters
    ----------
    sources : list of str, os.PathLike or zarr store
        The trajectories, in the order of their steps.
    out : str, os.PathLike or zarr store
        The trajectory to create.
    overwrite : bool
        Replace a trajectory already at ``out`` (default: refuse).
    progress : bool
        Draw a progress bar.

    Returns
    -------
    Trajectory
        The joined trajectory; :attr:`Trajectory.segments` says which rows and steps came from
        which source.

    Examples
    --------
    The notebook's Wordybird 1 (steps 0..100) and its continuation Wordybird 3 (steps 100..200):

    >>> from wordystore.tools.stitch import stitch
    >>> t = stitch(["runs/wb1.zarr", "runs/wb3.zarr"], "runs/wb1+3.zarr")  # doctest: +SKIP
    >>> [(s["steps"], s["dropped_repeated_steps"]) for s in t.segments]  # doctest: +SKIP
    [([0, 100], 0), ([101, 200], 1)]
    """
    from tqdm.auto import tqdm

    parts = check_sources(sources, out)
    segments, pieces, last_step, written = [], [], None, 0
    for part in parts:  # each contributes its rows after the steps before it: a suffix of rows
        first_kept = 0 if last_step is None else int(np.searchsorted(part.steps, last_step, side="right"))
        kept = len(part) - first_kept
        segments.append(
            {
                "source": describe(part.store),
                "rows": [written, written + kept],
                "steps": [int(part.steps[first_kept]), int(part.steps[-1])],
                "dropped_repeated_steps": first_kept,
                "config": part.config,
            }
        )
        pieces.append((written, part, first_kept))
        last_step, written = int(part.steps[-1]), written + kept
    steps = np.concatenate([part.steps[first:] for _, part, first in pieces])

    def read_tile(name: str, fetch: tuple, tile: np.ndarray) -> None:
        """Rows ``fetch[0]`` of the stitched trajectory, from the sources that hold them."""
        for (start, part, first), segment in zip(pieces, segments):
            lo, hi = max(fetch[0].start, start), min(fetch[0].stop, segment["rows"][1])
            if lo < hi:
                rows = slice(first + lo - start, first + hi - start, 1)
                part.read_into(name, (rows, *fetch[1:]), tile[lo - fetch[0].start : hi - fetch[0].start])

    first = parts[0]
    config = {"stitched_from": [describe(part.store) for part in parts], "segments": segments}
    config.update({k: v for k, v in first.config.items() if k == "seed_scalars"})
    with (
        create_whole(
            out,
            first.kinds,
            token_sets=first.token_sets,
            config=config,
            overwrite=overwrite,
            profile=first.profile,
            predictions=first.predictions,
        ) as w,
        tqdm(total=len(steps), desc="stitch", unit="row", disable=not progress) as bar,
    ):
        w.bulk_append(steps, read_tile, progress=bar.update)
    return trajectory.open(out)


def check_sources(sources, out) -> list[Trajectory]:
    """Open the sources and check that they can be joined into ``out``; return them in step order.

    Refused: fewer than two sources, an empty source, kinds or token sets that differ, two runs
    starting at the same step, a run whose steps all lie within earlier runs, ``out`` among the sources.
    """
    if len(sources) < 2:
        raise ValueError(f"stitch needs at least two trajectories, got {len(sources)}")
    parts = [trajectory.open(s) for s in sources]
    first = parts[0]
    for part in parts[1:]:
        if part.kinds != first.kinds:
            diff = sorted(
                f"{k}: {first.kinds.get(k)} vs {part.kinds.get(k)}"
                for k in set(first.kinds) | set(part.kinds)
                if first.kinds.get(k) != part.kinds.get(k)
            )
            raise ValueError(
                f"cannot stitch {describe(part.store)} onto {describe(first.store)}: kinds differ ({'; '.join(diff)})"
            )
        sets, first_sets = part.token_sets, first.token_sets
        if sets.keys() != first_sets.keys() or any(not np.array_equal(sets[k], first_sets[k]) for k in sets):
            raise ValueError(
                f"cannot stitch {describe(part.store)} onto {describe(first.store)}: their token sets differ"
            )
    out_path = Path(out).resolve() if isinstance(out, (str, os.PathLike)) and "://" not in os.fspath(out) else None
    for part in parts:
        root = local_root(part.store)
        if out_path is not None and root is not None and root.resolve() == out_path:
            raise ValueError(f"the output {out} is also a source; write the stitched trajectory to a new path")
        if len(part) == 0:
            raise ValueError(f"{describe(part.store)} has no recorded rows; nothing to stitch from it")
    parts.sort(key=lambda part: int(part.steps[0]))  # stable: equal first steps keep their given order
    for earlier, part in zip(parts, parts[1:]):  # each ends after the one before, so after all before
        if part.steps[0] == earlier.steps[0] or part.steps[-1] <= earlier.steps[-1]:
            raise ValueError(
                f"{describe(part.store)} (steps {part.steps[0]}..{part.steps[-1]}) adds no step after "
                f"{describe(earlier.store)} (steps {earlier.steps[0]}..{earlier.steps[-1]}); stitch joins a run "
                "and its continuations, each going on past the steps before it"
            )
    return parts
