"""The seed notebook's experiment, written out again from its description as the tests' reference.

Nothing here comes from ``trainer/``: the parameters (the notebook's cell 1), the dataset of windows
(cell 7), the model and its initialisation (cells 8-9), the in-RAM recorder (cell 10), the Trainer
subclass (cell 11) and the TrainingArguments (cell 12) are the notebook's, so that comparing the
project's trainer against :func:`run_notebook` bit for bit tests the trainer against the notebook,
not against itself. Cells 13-14 (record the initial state, train) are :func:`run_notebook`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments


@dataclasses.dataclass(frozen=True)
class NotebookParameters:
    """The notebook's cell 1, each value as it is there; the tests shrink the model and the run."""

    vocab_size: int = 50257
    hidden_dim: int = 64
    n_layer: int = 2
    n_head: int = 2
    max_seq_len: int = 128
    batch_size: int = 32
    steps: int = 200
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    init_scale: float = 0.02
    seed: int = 42


class TokenDataset(Dataset):
    """Cell 7: every window of ``max_seq_len + 1`` tokens; ``labels`` are the window shifted by one
    (and GPT-2 shifts them once more inside its loss, as in the notebook)."""

    def __init__(self, corpus, max_seq_len):
        self.corpus, self.max_seq_len = corpus, max_seq_len

    def __len__(self):
        return max(0, len(self.corpus) - self.max_seq_len)

    def __getitem__(self, idx):
        chunk = self.corpus[idx : idx + self.max_seq_len + 1]
        return {"input_ids": chunk[:-1], "labels": chunk[1:]}


def build_model(p: NotebookParameters) -> GPT2LMHeadModel:
    """Cells 8-9: GPT-2 without dropout, tied embeddings, cast to bfloat16; then the seed again and the
    embeddings drawn N(0, init_scale) in float32, cast to bfloat16."""
    config = GPT2Config(
        vocab_size=p.vocab_size,
        n_positions=p.max_seq_len,
        n_embd=p.hidden_dim,
        n_layer=p.n_layer,
        n_head=p.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config).to(torch.bfloat16)
    torch.manual_seed(p.seed)
    init_bf16 = (torch.randn(p.vocab_size, p.hidden_dim, dtype=torch.float32) * p.init_scale).to(torch.bfloat16)
    with torch.no_grad():
        model.transformer.wte.weight[:] = init_bf16
    return model


class ComprehensiveRecorder:
    """Cell 10, recording every step (``RECORD_EVERY_N_STEPS = 1``)."""

    def __init__(self, vocab_size, hidden_dim):
        self.vocab_size, self.hidden_dim = vocab_size, hidden_dim
        self.recorded_steps, self.embeddings, self.grads = [], [], []
        self.momentum, self.variance, self.logits, self.losses = [], [], [], []
        self.current_step = 0
        self.grad_before = self.loss_value = self.logits_sample = None

    def record_initial_state(self, model):
        W = model.transformer.wte.weight.data.clone().cpu().bfloat16()
        self.recorded_steps.append(0)
        self.embeddings.append(W)
        self.grads.append(torch.zeros_like(W))
        self.momentum.append(torch.zeros_like(W))
        self.variance.append(torch.zeros_like(W))
        self.logits.append(torch.zeros(self.vocab_size, dtype=torch.bfloat16))
        self.losses.append(torch.tensor(float("nan"), dtype=torch.bfloat16))
        self.current_step = 1

    def record_before_step(self, model, loss, logits):
        grad = model.transformer.wte.weight.grad
        self.grad_before = grad.clone().cpu().bfloat16()
        self.loss_value = loss.item()
        self.logits_sample = logits[0, -1, :].detach().cpu().bfloat16()

    def record_after_step(self, model, optimizer):
        # The Trainer also calls _maybe_log_save_evaluate once after its loop; the notebook's guard
        # (nothing captured since the last record) makes that call record nothing.
        if self.grad_before is not None and self.loss_value is not None:
            W = model.transformer.wte.weight.data.clone().cpu().bfloat16()
            state = optimizer.state[model.transformer.wte.weight]
            self.recorded_steps.append(self.current_step)
            self.embeddings.append(W)
            self.grads.append(self.grad_before)
            self.momentum.append(state["exp_avg"].clone().cpu().bfloat16())
            self.variance.append(state["exp_avg_sq"].clone().cpu().bfloat16())
            self.logits.append(self.logits_sample)
            self.losses.append(torch.tensor(self.loss_value, dtype=torch.bfloat16))
            self.grad_before = self.loss_value = self.logits_sample = None
        self.current_step += 1

    def get_data(self):
        return {
            "recorded_steps": torch.tensor(self.recorded_steps, dtype=torch.long),
            "embeddings": torch.stack(self.embeddings),
            "grads": torch.stack(self.grads),
            "momentum": torch.stack(self.momentum),
            "variance": torch.stack(self.variance),
            "logits": torch.stack(self.logits),
            "losses": torch.stack(self.losses),
        }


class InstrumentedTrainer(Trainer):
    """Cell 11: the model's own loss, and the recorder called around the optimizer step."""

    def __init__(self, recorder, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.recorder = recorder
        self.last_logits = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        self.last_logits = outputs.logits
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.recorder.record_before_step(model, loss, self.last_logits)
        return loss

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        self.recorder.record_after_step(self.model, self.optimizer)
        super()._maybe_log_save_evaluate(*args, **kwargs)


def run_notebook(p: NotebookParameters, ids, output_dir: str) -> dict:
    """The notebook's cells 2-14 on the CPU for the token ids ``ids``; returns its recorder's stacked tensors."""
    torch.manual_seed(p.seed)  # cell 2, at import time: GPT-2's own init below draws from it
    np.random.seed(p.seed)
    dataset = TokenDataset(torch.tensor(ids, dtype=torch.long), p.max_seq_len)
    model = build_model(p)
    recorder = ComprehensiveRecorder(p.vocab_size, p.hidden_dim)
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=p.steps,
        per_device_train_batch_size=p.batch_size,
        learning_rate=p.learning_rate,
        weight_decay=p.weight_decay,
        adam_beta1=p.adam_beta1,
        adam_beta2=p.adam_beta2,
        adam_epsilon=p.adam_epsilon,
        optim="adamw_torch",
        logging_steps=20,
        save_steps=p.steps + 1,
        save_total_limit=0,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        bf16=True,
        seed=p.seed,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = InstrumentedTrainer(recorder=recorder, model=model, args=args, train_dataset=dataset)
    recorder.record_initial_state(model)
    trainer.train()
    return recorder.get_data()
