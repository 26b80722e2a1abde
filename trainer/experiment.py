"""The Wordybird experiment as the seed notebook defines it: what it trains on (:func:`prepare_inputs`),
the Trainer (:class:`SeedTrainer`), its TrainingArguments (:func:`training_arguments`) and the
learning-rate policies of an extension. :mod:`trainer.run` runs it, recording into a trajectory.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import Trainer, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME

import wordystore
from trainer import state as run_state
from trainer.config import RunConfig
from trainer.data import DEFAULT_CORPUS, TokenDataset, load_corpus, load_tokenizer, tokenize_cached
from trainer.model import pick_device


@dataclasses.dataclass
class Inputs:
    """What a run trains on, and the ``data`` entry the store records about it."""

    device: str
    vocab_size: int
    token_sets: dict[str, np.ndarray]
    dataset: TokenDataset
    data: dict


def prepare_inputs(cfg: RunConfig) -> Inputs:
    """Seed, tokenizer, corpus, token ids, token sets and dataset: everything checked, nothing written."""
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
        token_sets = wordystore.token_sets_from_mask_file(cfg.token_masks, vocab_size)
    else:
        token_sets = wordystore.token_sets_from_ids(ids, vocab_size)
    dataset = TokenDataset(torch.tensor(ids, dtype=torch.long, device=device), cfg.max_seq_len)
    if len(dataset) == 0:
        raise ValueError(f"corpus has {len(ids)} tokens: too few for one window of {cfg.max_seq_len + 1}")
    data = {
        "tokenizer": tokenizer.name,
        "corpus": cfg.corpus or DEFAULT_CORPUS,
        "corpus_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "corpus_tokens": int(len(ids)),
        "dataset_windows": len(dataset),
        "vocab_size": vocab_size,
        "n_trained": int(len(token_sets["trained"])),
        "n_untrained": int(len(token_sets["untrained"])),
    }
    return Inputs(device, vocab_size, token_sets, dataset, data)


class SeedTrainer(Trainer):
    """The notebook's Trainer, plus going on from a state held in memory.

    ``compute_loss`` is the notebook's: the model's own mean loss, without ``num_items_in_batch``
    (the default Trainer would normalise the loss by the batch's token count instead, which rounds
    differently in bfloat16). Part of the experiment, not of the recording.

    ``resume_state`` (``(tensors, info)`` from :func:`trainer.state.capture`) is what
    ``train(resume_from_checkpoint=...)`` restores instead of the pickled files of a Trainer
    checkpoint; the Trainer's own resume logic still decides when (the RNGs after the data loader
    skipped the batches already trained on). ``extension`` (a record of the store's
    ``extensions`` list) replaces the LR schedule by the extension's policy.
    """

    def __init__(self, *args, resume_state: tuple[dict, dict] | None = None, extension: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.resume_state, self.extension = resume_state, extension

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.extension is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        steps = self.extension["to_step"] - self.extension["seam_step"]
        policy = self.extension["lr_policy"]
        if policy == "restart":
            return super().create_scheduler(steps, optimizer)
        base = self.args.learning_rate  # LambdaLR multiplies this by the factor below
        factor = self.extension["seam_lr"] / base if base else 0.0
        lr_lambda = functools.partial(_hold, factor) if policy == "hold" else functools.partial(_decay, factor, steps)
        self.lr_scheduler = LambdaLR(optimizer or self.optimizer, lr_lambda)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    # The Trainer's resume hooks, fed from ``resume_state`` instead of a checkpoint directory.

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self.resume_state is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        run_state.restore_model(model or self.model, self.resume_state[0])

    def _load_optimizer_and_scheduler(self, checkpoint):
        if self.resume_state is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        tensors, info = self.resume_state
        run_state.restore_optimizer(self.optimizer, tensors, info)
        if self.extension is not None and self.extension["seam_step"] == info["global_step"]:
            # at the seam the extension's new schedule sets the learning rate, not the saved one
            for group, lr in zip(self.optimizer.param_groups, self.lr_scheduler.get_last_lr()):
                group["lr"] = lr
        else:
            self.lr_scheduler.load_state_dict(info["lr_scheduler"])

    def _load_rng_state(self, checkpoint):
        if self.resume_state is None:
            return super()._load_rng_state(checkpoint)
        run_state.restore_rng(*self.resume_state)


def _hold(factor: float, step: int) -> float:
    return factor


def _decay(factor: float, steps: int, step: int) -> float:
    return factor * max(0.0, (steps - step) / steps)


def training_arguments(cfg: RunConfig, output_dir: str, device: str, max_steps: int | None = None) -> TrainingArguments:
    """The notebook's TrainingArguments (cell 12); no checkpoints, no console logging of our own."""
    args = dict(
        output_dir=output_dir,
        max_steps=cfg.steps if max_steps is None else max_steps,
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


def checkpoint_directory(path: Path, info: dict) -> str:
    """What ``SeedTrainer.train(resume_from_checkpoint=...)`` reads from disk: a directory holding only
    the TrainerState (global step, epoch) as JSON; the rest of the state comes through ``resume_state``."""
    path.mkdir()
    (path / TRAINER_STATE_NAME).write_text(json.dumps(info["trainer_state"]))
    return str(path)
