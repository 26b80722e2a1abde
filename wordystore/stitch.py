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

import wordystore
from wordystore.storage import describe, local_root

STEPS_PER_COPY = 8


def stitch(sources, out, *, overwrite=False, progress=True) -> wordystore.Trajectory:
    """Join the trajectories ``sources`` (paths or stores) into a new trajectory ``out``.

    Every source is checked before ``out`` is created (see :func:`check_sources`).

    >>> stitch(["runs/wb1.zarr", "runs/wb3.zarr"], "runs/wb1+3.zarr").segments
    """
    from tqdm.auto import tqdm

    runs = check_sources(sources, out)
    first = runs[0]
    sets = first.token_sets
    segments, last_step, written = [], None, 0
    config = {"stitched_from": [describe(r._store) for r in runs], "segments": segments}
    config.update({k: v for k, v in first.config.items() if k == "seed_scalars"})
    with wordystore.create(out, first.kinds, token_sets=sets, config=config, overwrite=overwrite) as w:
        bar = tqdm(total=sum(len(r) for r in runs), desc="stitch", unit="step", disable=not progress)
        for run in runs:
            keep = np.flatnonzero(run.steps > last_step) if last_step is not None else np.arange(len(run))
            for lo in range(0, len(keep), STEPS_PER_COPY):
                rows = keep[lo : lo + STEPS_PER_COPY]
                blocks = {name: run[name][rows] for name in run.kinds}
                for i, row in enumerate(rows):
                    w.append(int(run.steps[row]), **{name: block[i] for name, block in blocks.items()})
            bar.update(len(run))
            segments.append({  # check_sources made sure that every run keeps at least one row
                "source": describe(run._store),
                "rows": [written, written + len(keep)],
                "steps": [int(run.steps[keep[0]]), int(run.steps[keep[-1]])],
                "dropped_repeated_steps": int(len(run) - len(keep)),
                "config": run.config,
            })
            last_step = int(run.steps[keep[-1]])
            written += len(keep)
        bar.close()
        w.update_config(segments=segments)
    return wordystore.open(out)


def check_sources(sources, out) -> list[wordystore.Trajectory]:
    """Open the sources and check that they can be joined into ``out``; return them in step order.

    Refused: fewer than two sources, an empty source, kinds or token sets that differ, two runs
    starting at the same step, a run whose steps all lie within earlier runs, ``out`` among the sources.
    """
    if len(sources) < 2:
        raise ValueError(f"stitch needs at least two trajectories, got {len(sources)}")
    runs = [wordystore.open(s) for s in sources]
    first = runs[0]
    for run in runs[1:]:
        if run.kinds != first.kinds:
            diff = sorted(
                f"{k}: {first.kinds.get(k)} vs {run.kinds.get(k)}"
                for k in set(first.kinds) | set(run.kinds) if first.kinds.get(k) != run.kinds.get(k)
            )
            raise ValueError(f"cannot stitch {describe(run._store)} onto {describe(first._store)}: kinds differ ({'; '.join(diff)})")
        sets, first_sets = run.token_sets, first.token_sets
        if sets.keys() != first_sets.keys() or any(not np.array_equal(sets[k], first_sets[k]) for k in sets):
            raise ValueError(f"cannot stitch {describe(run._store)} onto {describe(first._store)}: their token sets differ")
    out_path = Path(out).resolve() if isinstance(out, (str, os.PathLike)) and "://" not in os.fspath(out) else None
    for run in runs:
        root = local_root(run._store)
        if out_path is not None and root is not None and root.resolve() == out_path:
            raise ValueError(f"the output {out} is also a source; write the stitched trajectory to a new path")
        if len(run) == 0:
            raise ValueError(f"{describe(run._store)} has no recorded rows; nothing to stitch from it")
    runs.sort(key=lambda run: int(run.steps[0]))  # stable: equal first steps keep their given order
    for earlier, run in zip(runs, runs[1:]):  # each run ends after the one before, so after all before
        if run.steps[0] == earlier.steps[0] or run.steps[-1] <= earlier.steps[-1]:
            raise ValueError(
                f"{describe(run._store)} (steps {run.steps[0]}..{run.steps[-1]}) adds no step after "
                f"{describe(earlier._store)} (steps {earlier.steps[0]}..{earlier.steps[-1]}); stitch joins a run "
                "and its continuations, each going on past the steps before it"
            )
    return runs
