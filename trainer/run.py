"""The Wordybird experiment end to end: ``wordystore train OUT`` calls :func:`train`.

Read top to bottom it is the seed notebook: seed, tokenizer, corpus, token sets, model,
initialisation, Trainer, train; but each step streams into a trajectory instead of RAM.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

import wordystore
from trainer.config import RunConfig
from trainer.data import (
    TokenDataset,
    load_corpus,
    load_tokenizer,
    token_sets_from_ids,
    token_sets_from_mask_file,
    tokenize_cached,
)
from trainer.model import build_model, pick_device
from trainer.recording import TrajectoryCallback, kinds_for


class SeedTrainer(Trainer):
    """The notebook's ``compute_loss``: the model's own mean loss, without ``num_items_in_batch``.

    Part of the experiment, not of the recording: the default Trainer would normalise the loss by
    the batch's token count instead, which rounds differently in bfloat16.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss


def training_arguments(cfg: RunConfig, output_dir: str, device: str) -> TrainingArguments:
    """The notebook's TrainingArguments (cell 12); no checkpoints, no console logging of our own."""
    args = dict(
        output_dir=output_dir,
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_epsilon=cfg.adam_epsilon,
        optim="adamw_torch",
        logging_steps=20,
        save_strategy="no",  # the notebook asks for no checkpoints (save_steps > max_steps)
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        bf16=True,
        seed=cfg.seed,
        report_to="none",
        disable_tqdm=True,
        use_cpu=device == "cpu",
    )
    args.update(cfg.training_args)
    return TrainingArguments(**args)


def _jsonable(value):
    """JSON-safe copy (enums and paths as strings, non-finite floats as strings)."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return clean(json.loads(json.dumps(value, default=str)))


class ProgressBar(TrainerCallback):
    """One line: step, loss, learning rate, steps/s and the store's size on disk."""

    def __init__(self, recording: TrajectoryCallback, store_path: Path, total: int):
        from tqdm.auto import tqdm

        self.recording, self.store_path = recording, store_path
        self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)
        self.size_mb = 0.0

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step % 8 == 0:  # a chunk's worth of steps: the store has grown
            self.size_mb = store_size(self.store_path) / 1e6
        lr = optimizer.param_groups[0]["lr"] if optimizer is not None else math.nan
        self.bar.set_postfix_str(f"loss {self.recording.last_loss:.4f} lr {lr:.2e} store {self.size_mb:.0f} MB")
        self.bar.update(1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.bar.write(f"step {state.global_step:>5}  loss {logs['loss']:.4f}  lr {logs.get('learning_rate', 0):.3e}")

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def store_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def train(out: str | Path, cfg: RunConfig, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Run the experiment described by ``cfg``, recording it into a new trajectory at ``out``."""
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)

    tokenizer = load_tokenizer(cfg.tokenizer)
    text = load_corpus(cfg.corpus)
    ids = tokenize_cached(text, tokenizer)
    vocab_size = cfg.vocab_size or tokenizer.vocab_size
    if ids.size and ids.max() >= vocab_size:  # a vocabulary smaller than the tokenizer's (quick tests)
        ids = ids % vocab_size
    if cfg.token_masks:
        token_sets = token_sets_from_mask_file(cfg.token_masks, vocab_size)
    else:
        token_sets = token_sets_from_ids(ids, vocab_size)
    dataset = TokenDataset(torch.tensor(ids, dtype=torch.long, device=device), cfg.max_seq_len)
    if len(dataset) == 0:
        raise ValueError(f"corpus has {len(ids)} tokens: too few for one window of {cfg.max_seq_len + 1}")

    model = build_model(cfg, vocab_size, device)
    out = Path(out)
    args = training_arguments(cfg, str(out.with_name(out.name + ".trainer")), device)
    config = _jsonable({
        "run": cfg.to_dict(),
        "training_arguments": args.to_dict(),
        "model": model.config.to_dict(),
        "data": {
            "tokenizer": tokenizer.name,
            "corpus": cfg.corpus or "pydoc_data.topics",
            "corpus_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "corpus_tokens": int(len(ids)),
            "dataset_windows": len(dataset),
            "vocab_size": vocab_size,
            "n_trained": int(len(token_sets["trained"])),
            "n_untrained": int(len(token_sets["untrained"])),
        },
        "device": device,
    })
    embedding = model.transformer.wte.weight
    kinds = kinds_for({"embeddings": embedding}, vocab_size)
    # Recorded every step, Adam's moments compress far better as residuals of a replayed update.
    predictions = None
    if cfg.record_every == 1 and args.optim.startswith("adamw"):
        predictions = wordystore.adam_predictions(args.adam_beta1, args.adam_beta2, args.max_grad_norm or None)
    writer = wordystore.create(out, kinds, token_sets=token_sets, config=config, overwrite=overwrite,
                               predictions=predictions)
    with writer:
        callback = TrajectoryCallback(writer, model, {"embeddings": embedding}, cfg.record_every)
        trainer = SeedTrainer(model=model, args=args, train_dataset=dataset, callbacks=[callback])
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        if progress:
            trainer.add_callback(ProgressBar(callback, out, cfg.steps))
        start = time.perf_counter()
        trainer.train()
        elapsed = time.perf_counter() - start
        writer.update_config(summary={"train_seconds": round(elapsed, 3), "steps": cfg.steps})
    summary = {
        "store": str(out),
        "steps": cfg.steps,
        "rows": writer.committed,
        "seconds": elapsed,
        "steps_per_second": cfg.steps / elapsed if elapsed else math.inf,
        "store_bytes": store_size(out),
        "n_trained": len(token_sets["trained"]),
        "n_untrained": len(token_sets["untrained"]),
    }
    return summary


def main_summary(summary: dict) -> str:
    return (
        f"recorded {summary['rows']} rows ({summary['steps']} steps) into {summary['store']} "
        f"in {summary['seconds']:.1f} s ({summary['steps_per_second']:.2f} steps/s); "
        f"store {summary['store_bytes'] / 1e6:.1f} MB on disk; "
        f"token sets: {summary['n_trained']} trained, {summary['n_untrained']} untrained"
    )

