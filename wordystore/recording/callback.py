"""A Hugging Face ``Trainer`` run recorded by a :class:`~wordystore.recording.recorder.ParameterRecorder`."""

from __future__ import annotations

import math

from transformers import TrainerCallback

from wordystore.recording.recorder import ParameterRecorder
from wordystore.write.writer import TrajectoryWriter


class TrajectoryCallback(TrainerCallback):
    """Records a Hugging Face ``Trainer`` run into ``writer``, every ``record_every`` optimizer steps.

    Parameters
    ----------
    writer : TrajectoryWriter or None
        The store's writer (created with :func:`~wordystore.recording.kinds_for` of the same
        parameters), left open; None on the ranks of a distributed run that do not write.
    model : torch.nn.Module
        The model the Trainer trains (``trainer.model``, not a DDP wrapper of it).
    parameters : mapping or sequence
        What to record, by object or by name in ``model``, e.g.
        ``{"embeddings": model.transformer.wte.weight}`` or ``["lm_head.weight"]``.
    record_every : int
        Write every ``record_every`` steps; the last step of the run always.

    Row 0 (the initial state) is written when training begins. A step's row is appended when the
    step has ended (after the scheduler's step), so whatever runs right after an append (the
    writer's state provider) sees the run between two steps.
    """

    def __init__(self, writer: TrajectoryWriter | None, model, parameters, record_every: int = 1):
        self.recorder = ParameterRecorder(writer, model, parameters, record_every)
        self.writer = writer
        self._grad_norm_clipped = math.nan
        self.last_lr = math.nan  # the learning rate of the last step taken
        self.between_steps = True  # False from a step's start to its row being appended

    @property
    def last_loss(self) -> float:
        return self.recorder.last_loss

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0 and self.writer is not None and self.writer.last_step is None:
            self.recorder.record_initial(0)

    def on_step_begin(self, args, state, control, **kwargs):
        self.between_steps = False

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self._grad_norm_clipped = self.recorder.after_clipping(model.parameters())

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.last_lr = optimizer.param_groups[0]["lr"]  # the scheduler moves it on before on_step_end

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.between_steps = True  # before the append: the writer may ask for the run's state in it
        last = state.global_step == state.max_steps
        self.recorder.record_step(state.global_step, optimizer, self.last_lr, self._grad_norm_clipped, last=last)

    def on_train_end(self, args, state, control, **kwargs):
        self.recorder.remove()
