"""Time per step and peak RSS of the seed experiment: no recording, wordystore recording, and the
notebook's in-RAM recorder, each in its own process, in one run.

    python bench/trainer_bench.py --steps 24
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, resource, numpy as np, torch
sys.path[:0] = [{root!r}, {tests!r}]
from trainer.config import RunConfig
from trainer.data import load_corpus, load_tokenizer, tokenize_cached, TokenDataset
from trainer.model import build_model
from trainer.run import SeedTrainer, training_arguments, train
from transformers import TrainerCallback
mode, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = RunConfig(steps=steps)
times = []
class Clock(TrainerCallback):
    def on_step_begin(self, *a, **k): self.t = time.perf_counter()
    def on_step_end(self, *a, **k): times.append(time.perf_counter() - self.t)
if mode == "wordystore":
    import trainer.run as run
    orig = run.SeedTrainer.__init__
    def init(self, *a, callbacks=(), **k): orig(self, *a, callbacks=[*callbacks, Clock()], **k)
    run.SeedTrainer.__init__ = init
    train(out, cfg, progress=False)
else:
    tok = load_tokenizer(); ids = tokenize_cached(load_corpus(), tok)
    if mode == "notebook":
        from notebook_reference import run_notebook, InstrumentedTrainer
        orig = InstrumentedTrainer.__init__
        def init(self, *a, **k): orig(self, *a, **k); self.add_callback(Clock())
        InstrumentedTrainer.__init__ = init
        run_notebook(cfg, ids, tok.vocab_size, out)
    else:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg, tok.vocab_size, "cpu")
        ds = TokenDataset(torch.tensor(ids), cfg.max_seq_len)
        SeedTrainer(model=model, args=training_arguments(cfg, out, "cpu"), train_dataset=ds, callbacks=[Clock()]).train()
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"mode": mode, "median_step_s": float(np.median(times[2:])), "mean_step_s": float(np.mean(times[2:])), "peak_rss_mb": rss}}))
"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=24)
    ns = parser.parse_args()
    code = CHILD.format(root=str(ROOT), tests=str(ROOT / "tests"))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("none", "wordystore", "notebook"):
            out = Path(tmp) / f"{mode}.zarr"
            proc = subprocess.run([sys.executable, "-c", code, mode, str(ns.steps), str(out)],
                                  capture_output=True, text=True, check=True)
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(results[-1], flush=True)
    base = results[0]["median_step_s"]
    print(f"\n| mode | median s/step | vs no recording | peak RSS MB |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['median_step_s']:.3f} | {100 * (r['median_step_s'] / base - 1):+.1f} % | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
