"""The seed job two ways, each a whole process, side by side in one run: the notebook's own code path
(bench/notebook_job.py: its in-RAM recorder and InstrumentedTrainer, then its save_file) and
``wordystore train``. Tokenization is included in both (wordystore's token cache starts empty).

    python -m bench.trainer_bench --steps 10 --repeats 3

Runs alternate (notebook, wordystore, notebook, ...) so that drift in the machine's load hits both;
the ratio is the notebook's median wall time over wordystore's. Per process it also reports user
and system CPU seconds, minor page faults and peak RSS (from wait4).
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_process(argv: list[str], env: dict) -> dict:
    """Run ``argv`` to its end; its wall time and the kernel's accounting of it."""
    with tempfile.TemporaryFile() as stderr:
        began = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        _, status, usage = os.wait4(proc.pid, 0)  # wait4, not proc.wait(): it also returns the child's rusage
        wall = time.perf_counter() - began
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            stderr.seek(0)
            raise SystemExit(f"{argv[:4]} failed ({proc.returncode}):\n{stderr.read().decode()[-2000:]}")
    return {
        "wall_s": wall,
        "user_s": usage.ru_utime,
        "sys_s": usage.ru_stime,
        "minflt": usage.ru_minflt,
        "peak_rss_gb": usage.ru_maxrss / 1e6,
    }


def side_by_side(steps: int, repeats: int, batch_size: int | None = None) -> dict[str, list[dict]]:
    """Each code path ``repeats`` times, alternating; per run, :func:`run_process`'s figures.
    ``batch_size``: the seed's 32 unless given."""
    batch = batch_size or 32  # the seed's
    results = {"notebook": [], "wordystore": []}
    with tempfile.TemporaryDirectory(prefix="trainer-bench-") as tmp:
        for repeat in range(repeats):
            for mode in results:
                out = Path(tmp) / f"{mode}-{repeat}"
                env = {**os.environ, "WORDYSTORE_CACHE": str(out / "cache"), "TOKENIZERS_PARALLELISM": "false"}
                if mode == "notebook":
                    out.mkdir()
                    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests")])  # notebook_reference
                    argv = [sys.executable, "-m", "bench.notebook_job", str(steps), str(out), str(batch)]
                else:
                    argv = [
                        sys.executable,
                        "-m",
                        "wordystore.cli",
                        "train",
                        str(out / "run.zarr"),
                        "--steps",
                        str(steps),
                        "--batch-size",
                        str(batch),
                        "--quiet",
                    ]
                results[mode].append(run_process(argv, env))
                print(mode, {k: round(v, 2) for k, v in results[mode][-1].items()}, flush=True)
    return results


def medians(results: dict[str, list[dict]]) -> dict[str, dict]:
    return {
        mode: {key: statistics.median(row[key] for row in rows) for key in rows[0]} for mode, rows in results.items()
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    ns = parser.parse_args()
    results = side_by_side(ns.steps, ns.repeats)
    print(f"\n{ns.steps} steps, whole processes, {ns.repeats} repeats (medians)\n")
    print("| code path | wall s | user s | sys s | minor faults | peak RSS GB |\n|---|---|---|---|---|---|")
    middle = medians(results)
    for mode, m in middle.items():
        print(
            f"| {mode} | {m['wall_s']:.1f} | {m['user_s']:.1f} | {m['sys_s']:.1f} | {m['minflt']:,.0f} "
            f"| {m['peak_rss_gb']:.2f} |"
        )
    ratios = [nb["wall_s"] / ws["wall_s"] for nb, ws in zip(results["notebook"], results["wordystore"])]
    print(
        f"\nwordystore train is {middle['notebook']['wall_s'] / middle['wordystore']['wall_s']:.2f}x as fast "
        f"as the notebook's code path (pairwise: {', '.join(f'{r:.2f}x' for r in ratios)})"
    )


if __name__ == "__main__":
    main()
