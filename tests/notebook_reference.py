"""The seed notebook's in-RAM recorder and Trainer subclass, reimplemented as the tests' reference.

Copied in substance from ``wordybird_1b_notebook.txt`` cells 7-13 (recorder, InstrumentedTrainer,
TrainingArguments), so that the project's trainer can be compared bit for bit against it.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import Trainer, TrainingArguments

from trainer.config import RunConfig
from trainer.data import TokenDataset
from trainer.model import build_model


class ComprehensiveRecorder:
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


def run_notebook(cfg: RunConfig, ids: np.ndarray, vocab_size: int, output_dir: str) -> dict:
    """The notebook's cells 2-14 for ``cfg``; returns its recorder's stacked tensors."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    dataset = TokenDataset(torch.tensor(ids, dtype=torch.long), cfg.max_seq_len)
    model = build_model(cfg, vocab_size, "cpu")
    recorder = ComprehensiveRecorder(vocab_size, cfg.hidden_dim)
    args = TrainingArguments(
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
        save_steps=cfg.steps + 1,
        save_total_limit=0,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        bf16=True,
        seed=cfg.seed,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
    )
    trainer = InstrumentedTrainer(recorder=recorder, model=model, args=args, train_dataset=dataset)
    recorder.record_initial_state(model)
    trainer.train()
    return recorder.get_data()
