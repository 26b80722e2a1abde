"""The seed run trained once per mode, one after the other in this process, each step timed:
``none`` (no store) and ``recording`` (``wordystore train``'s recording). ``python -m bench`` runs it
as a whole process (:func:`recording_runs`) and reads the JSON line it prints last.

    python -m bench.recording_job none,recording OUT '{"steps": 10, "hidden_dim": 16}'
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from transformers import TrainerCallback

from trainer import run
from trainer.config import RunConfig
from trainer.memory import reuse_freed_memory


class StepClock(TrainerCallback):
    """The wall time of each training step, from its beginning to its end."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, *args, **kwargs):
        self.began = time.perf_counter()

    def on_step_end(self, *args, **kwargs):
        self.times.append(time.perf_counter() - self.began)


def cpu_seconds() -> float:
    """This process's CPU seconds and its waited-for children's (the writer's child process)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed_runs(modes: list[str], out: str, args: dict) -> list[dict]:
    """Train ``RunConfig(**args)`` once per mode into ``out.<mode>``; per mode, the steps' times after
    the first two (which warm caches and allocators) and the writer's close."""
    results = []
    for mode in modes:
        clock = StepClock()
        began = cpu_seconds()
        summary = run.train(
            f"{out}.{mode}", RunConfig(**args), progress=False, record=mode == "recording", callbacks=[clock]
        )
        steady = clock.times[2:]
        results.append(
            {
                "mode": mode,
                "median_step_s": float(np.median(steady)),
                "train_s": float(np.sum(steady)),
                "steps_per_s": len(steady) / float(np.sum(steady)),
                "close_s": summary.get("close_seconds", 0.0),
                "cpu_s": cpu_seconds() - began,
                "steps": len(clock.times),
            }
        )
    return results


def recording_runs(modes: list[str], args: dict, tmp: Path) -> list[dict]:
    """:func:`timed_runs` in a process of its own (``python -m bench.recording_job``)."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.recording_job", ",".join(modes), str(tmp / "run"), json.dumps(args)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    modes, out, args = sys.argv[1].split(","), sys.argv[2], json.loads(sys.argv[3])
    reuse_freed_memory(reexec=True)  # as `wordystore train` runs, in every mode
    print(json.dumps(timed_runs(modes, out, args)))


if __name__ == "__main__":
    main()
