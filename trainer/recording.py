"""Recording a training run into a wordystore trajectory.

- :class:`ParameterRecorder` works in any PyTorch loop: call ``after_backward`` then
  ``after_optimizer_step`` each step.
- :class:`TrajectoryCallback` hooks it into a Hugging Face ``Trainer``.

Semantics (the seed notebook's): row 0 is the initial state (zeros for gradients, Adam moments and
logits, NaN loss). At each step, the gradient as it stands after backward (before clipping and the
optimizer step); the parameter and Adam's ``exp_avg``/``exp_avg_sq`` after the optimizer step; the
logits of the first sequence's last position; the loss; the learning rate used; the gradient norm
over all parameters before and after clipping (float32).
"""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback

from wordystore import Kind, TrajectoryWriter

PER_PARAMETER_KINDS = ("embeddings", "grads", "momentum", "variance")
SCALAR_KINDS = {
    "losses": Kind((), "bfloat16", ()),
    "learning_rate": Kind((), "float32", ()),
    "grad_norm": Kind((), "float32", ()),
    "grad_norm_clipped": Kind((), "float32", ()),
}


def kinds_for(parameters: dict[str, torch.nn.Parameter], vocab_size: int | None) -> dict[str, Kind]:
    """The kinds a recorder of these parameters writes. The parameter named ``embeddings`` is a
    [token, dim] matrix; other parameters get kinds ``<name>``, ``<name>.grad``, ``<name>.exp_avg``,
    ``<name>.exp_avg_sq``."""
    kinds = {}
    for name, param in parameters.items():
        dims = ("token", "dim") if name == "embeddings" else None
        for kind_name in _kind_names(name):
            kinds[kind_name] = Kind(tuple(param.shape), "bfloat16", dims)
    if vocab_size is not None:
        kinds["logits"] = Kind((vocab_size,), "bfloat16", ("token",))
    kinds.update(SCALAR_KINDS)
    return kinds


def _kind_names(name: str) -> tuple[str, str, str, str]:
    if name == "embeddings":
        return PER_PARAMETER_KINDS
    return name, f"{name}.grad", f"{name}.exp_avg", f"{name}.exp_avg_sq"


class ParameterRecorder:
    """Records named parameters, their gradients and Adam moments, the loss and a logits sample.

    ``parameters`` maps kind names to parameters (``{"embeddings": model.transformer.wte.weight}``);
    ``model`` is watched through a forward hook for ``loss`` and ``logits`` (its output must carry
    them, as Hugging Face models' outputs do). ``record_every`` skips steps between records.
    """

    def __init__(self, writer: TrajectoryWriter, model: torch.nn.Module, parameters: dict, record_every: int = 1):
        if record_every < 1:
            raise ValueError(f"record_every must be >= 1, got {record_every}")
        self.writer, self.parameters, self.record_every = writer, parameters, record_every
        self._grads: dict[str, torch.Tensor] = {}
        self._grad_sq: dict[torch.nn.Parameter, torch.Tensor] = {}
        self._loss = self._logits = None
        self.last_loss = math.nan
        self._hooks = [model.register_forward_hook(self._on_forward)]
        for param in model.parameters():
            if param.requires_grad:
                self._hooks.append(param.register_post_accumulate_grad_hook(self._on_grad))
        self._names = {id(p): n for n, p in parameters.items()}

    # hooks --------------------------------------------------------------------------------------

    def _on_forward(self, module, args, output) -> None:
        if module.training and getattr(output, "loss", None) is not None:
            self._loss = output.loss.detach()
            # clone: a view would keep the whole [batch, seq, vocab] logits tensor alive
            self._logits = output.logits[0, -1].detach().clone()

    def _on_grad(self, param: torch.nn.Parameter) -> None:
        grad = param.grad.detach()
        self._grad_sq[param] = grad.float().pow(2).sum()
        name = self._names.get(id(param))
        if name is not None:
            self._grads[name] = grad.to(torch.bfloat16, copy=True)

    # recording ----------------------------------------------------------------------------------

    def record_initial(self, step: int = 0) -> None:
        """Row for the state before training: the parameters, zeros elsewhere, NaN loss."""
        tensors = {}
        for name, param in self.parameters.items():
            value, grad, mom, var = _kind_names(name)
            tensors[value] = param.detach().to(torch.bfloat16)
            zeros = torch.zeros(param.shape, dtype=torch.bfloat16)
            tensors.update({grad: zeros, mom: zeros, var: zeros})
        if "logits" in self.writer.kinds:
            tensors["logits"] = torch.zeros(self.writer.kinds["logits"].shape, dtype=torch.bfloat16)
        tensors.update(losses=math.nan, learning_rate=math.nan, grad_norm=math.nan, grad_norm_clipped=math.nan)
        self.writer.append(step, **tensors)

    def after_clipping(self, parameters) -> float:
        """Gradient norm after clipping (call between clipping and the optimizer step)."""
        norms = [p.grad.detach().float().pow(2).sum() for p in parameters if p.grad is not None]
        return math.sqrt(sum(n.item() for n in norms)) if norms else 0.0

    def record_step(
        self, step: int, optimizer: torch.optim.Optimizer, lr: float, grad_norm_clipped: float, *, last: bool = False
    ) -> None:
        """After the optimizer step: write row ``step`` if it is a recorded one (every ``record_every``
        steps, and the ``last`` step of a run whatever its number)."""
        if self._loss is not None:
            self.last_loss = self._loss.item()
        if step % self.record_every and not last:
            return self._reset()
        if self._loss is None:
            raise RuntimeError("no loss seen: the model's forward output carried no .loss during training")
        tensors = {}
        for name, param in self.parameters.items():
            value, grad, mom, var = _kind_names(name)
            state = optimizer.state.get(param, {})
            zeros = torch.zeros(param.shape, dtype=torch.bfloat16)
            tensors[value] = param.detach().to(torch.bfloat16)
            tensors[grad] = self._grads.get(name, zeros)
            tensors[mom] = state["exp_avg"].detach().to(torch.bfloat16) if "exp_avg" in state else zeros
            tensors[var] = state["exp_avg_sq"].detach().to(torch.bfloat16) if "exp_avg_sq" in state else zeros
        if "logits" in self.writer.kinds:
            tensors["logits"] = self._logits.to(torch.bfloat16)
        tensors["losses"] = torch.tensor(self.last_loss, dtype=torch.bfloat16)
        tensors["learning_rate"] = float(lr)
        tensors["grad_norm"] = math.sqrt(sum(n.item() for n in self._grad_sq.values()))
        tensors["grad_norm_clipped"] = float(grad_norm_clipped)
        self.writer.append(step, **tensors)
        self._reset()

    def _reset(self) -> None:
        self._grads.clear()
        self._grad_sq.clear()
        self._loss = self._logits = None

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


class TrajectoryCallback(TrainerCallback):
    """Records a Hugging Face ``Trainer`` run into ``writer``, every ``record_every`` optimizer steps.

    ``parameters`` names what to record, e.g. ``{"embeddings": model.transformer.wte.weight}``.
    Row 0 (the initial state) is written when training begins, the last step of the run always; the
    writer is left open. A step's
    row is appended when the step has ended (after the scheduler's step), so whatever runs right
    after an append (the writer's state provider) sees the run between two steps.
    """

    def __init__(self, writer: TrajectoryWriter, model, parameters: dict, record_every: int = 1):
        self.recorder = ParameterRecorder(writer, model, parameters, record_every)
        self.writer = writer
        self._grad_norm_clipped = math.nan
        self.last_lr = math.nan  # the learning rate of the last step taken
        self.between_steps = True  # False from a step's start to its row being appended

    @property
    def last_loss(self) -> float:
        return self.recorder.last_loss

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0 and self.writer.last_step is None:
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
