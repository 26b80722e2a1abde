"""Joining runs along the step axis, e.g. WB1 (steps 0-100) and WB3 (resumed at 100, to 200).

The result is an ordinary trajectory whose metadata lists its segments: each source's path, config,
and the rows and steps it contributed, so the seams stay visible (``t.segments``). Where a later run
repeats steps an earlier one recorded (a resumed run records its starting state again), the earlier
run's rows are kept and the repeats are dropped and counted.
"""

from __future__ import annotations

import numpy as np

import wordystore
from wordystore.storage import describe

STEPS_PER_COPY = 8


def stitch(sources, out, *, overwrite=False, progress=True) -> wordystore.Trajectory:
    """Write the trajectories ``sources`` (paths or stores), in order, into a new trajectory ``out``."""
    from tqdm.auto import tqdm

    runs = [wordystore.open(s) for s in sources]
    if len(runs) < 2:
        raise ValueError("stitch needs at least two trajectories")
    first = runs[0]
    for run in runs[1:]:
        if run.kinds != first.kinds:
            diff = sorted(
                f"{k}: {first.kinds.get(k)} vs {run.kinds.get(k)}"
                for k in set(first.kinds) | set(run.kinds) if first.kinds.get(k) != run.kinds.get(k)
            )
            raise ValueError(f"cannot stitch {describe(run._store)} onto {describe(first._store)}: kinds differ ({'; '.join(diff)})")
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
            if len(keep):
                segments.append({
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
