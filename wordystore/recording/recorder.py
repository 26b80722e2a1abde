"""Recording named parameters of any PyTorch loop, each in its own dtype.

:func:`kinds_for` declares what a :class:`ParameterRecorder` writes, for :func:`wordystore.create`;
the recorder then appends a row per recorded step. What a row holds (docs/recording.md):

- row 0, :meth:`ParameterRecorder.record_initial`: the parameters before training, zeros for their
  gradients, Adam's moments and the logits, NaN scalars;
- row ``step``, :meth:`ParameterRecorder.record_step` after the optimizer step: each parameter as
  the step left it; its gradient as backward left it (before clipping; under DDP after the
  all-reduce, the gradient every rank's optimizer steps with); the optimizer's ``exp_avg`` and
  ``exp_avg_sq`` of it; the logits of the first sequence's last position and the loss of the
  step's last forward (the mean over ranks); the learning rate; the gradient norm over all
  parameters before and after clipping.

Tensors are recorded in their own dtype, never rounded: a float32 parameter, its gradient and its
moments go into float32 kinds, a bfloat16 one into bfloat16 kinds, and a tensor whose dtype is
not its kind's is refused by the writer. The model's outputs, the logits sample and the loss, are
samples of what the model computed, and take the dtype they are declared with (``logits_dtype``
and ``loss_dtype``, float32 by default: the seed notebook keeps both in bfloat16).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch.autograd import Variable

from wordystore.format.kinds import DTYPES, Kind
from wordystore.format.layout import check_predictions
from wordystore.format.prediction import AdamPrediction
from wordystore.write.writer import TrajectoryWriter

# A parameter recorded as ``embeddings`` takes the seed notebook's kind names.
SEED_NAMES = {"embeddings": ("embeddings", "grads", "momentum", "variance")}
TORCH_DTYPE_NAMES = {torch_dtype: name for name, (_, torch_dtype) in DTYPES.items()}


def named_parameters(
    parameters: Mapping[str, torch.Tensor | str] | Sequence[torch.Tensor | str], model: torch.nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """The parameters to record, by kind name.

    Parameters
    ----------
    parameters : mapping or sequence
        Kind names to parameters, each given by object or by its name in ``model`` (as
        ``model.named_parameters()`` spells it); or a list of parameters, by object or by name,
        each recorded under its name in ``model``.
    model : torch.nn.Module, optional
        The model the names are looked up in (needed for names, and for a list of objects).

    Returns
    -------
    dict
        Kind name -> parameter. A name the model does not have raises ValueError.

    >>> named_parameters(["lm_head.weight"], model)  # doctest: +SKIP
    {'lm_head.weight': Parameter(...)}
    """
    in_model = {} if model is None else dict(model.named_parameters())
    names = {id(p): name for name, p in in_model.items()}
    given = parameters.items() if isinstance(parameters, Mapping) else [(None, p) for p in parameters]
    resolved = {}
    for kind, param in given:
        if isinstance(param, str):
            if param not in in_model:
                where = "the model" if model is not None else "a model: give model= to name parameters"
                raise ValueError(f"{param!r} is not a parameter of {where}")
            name, param = param, in_model[param]
        elif isinstance(param, torch.Tensor):
            name = names.get(id(param))
        else:
            raise TypeError(f"a parameter is a tensor or its name in the model, not {type(param).__name__}")
        if kind is None and name is None:
            raise ValueError(
                "a parameter given alone is recorded under its name in the model, and this one is not in "
                "model.named_parameters(): give model=, or a mapping from kind names to parameters"
            )
        resolved[name if kind is None else kind] = param
    return resolved


def kinds_for(
    parameters: Mapping[str, torch.Tensor | str] | Sequence[torch.Tensor | str],
    vocab_size: int | None = None,
    *,
    model: torch.nn.Module | None = None,
    logits_dtype: str = "float32",
    loss_dtype: str = "float32",
) -> dict[str, Kind]:
    """The kinds a :class:`ParameterRecorder` of these parameters writes.

    Parameters
    ----------
    parameters : mapping or sequence
        What to record, by object or by name in ``model`` (:func:`named_parameters`).
    vocab_size : int, optional
        The vocabulary's size: a parameter whose first axis has this many rows is indexed by
        token (dims ``token, dim``), so that token sets select its rows; and the ``logits`` kind.
    model : torch.nn.Module, optional
        The model that names the parameters.
    logits_dtype, loss_dtype : str
        The dtypes the model's outputs are recorded in (float32 holds a bfloat16 or float16
        output exactly; the seed notebook keeps both in bfloat16).

    Returns
    -------
    dict
        Each parameter's four kinds in its own dtype: ``<name>``, ``<name>.grad``,
        ``<name>.exp_avg`` and ``<name>.exp_avg_sq`` (one named ``embeddings`` gets the seed's
        ``embeddings``, ``grads``, ``momentum`` and ``variance``); ``logits`` with ``vocab_size``;
        the scalars ``losses``, ``learning_rate``, ``grad_norm`` and ``grad_norm_clipped``.

    >>> kinds_for({"embeddings": model.transformer.wte.weight}, 50257)  # doctest: +SKIP
    """
    params = named_parameters(parameters, model)
    kinds = {}
    for name, param in params.items():
        if param.dtype not in TORCH_DTYPE_NAMES:
            raise ValueError(f"parameter {name!r} is {param.dtype}, which a store cannot hold as it is")
        kind = Kind(tuple(param.shape), TORCH_DTYPE_NAMES[param.dtype], _dims(param.shape, vocab_size))
        kinds.update(dict.fromkeys(kind_names(name), kind))
    if vocab_size is not None:
        kinds["logits"] = Kind((vocab_size,), logits_dtype, ("token",))
    kinds["losses"] = Kind((), loss_dtype, ())
    kinds.update({name: Kind((), "float32", ()) for name in ("learning_rate", "grad_norm", "grad_norm_clipped")})
    return kinds


def kind_names(name: str) -> tuple[str, str, str, str]:
    """The kinds of the parameter recorded as ``name``: itself, its gradient, Adam's two moments."""
    return SEED_NAMES.get(name) or (name, f"{name}.grad", f"{name}.exp_avg", f"{name}.exp_avg_sq")


def predictions_for(
    kinds: Mapping[str, Kind], beta1: float, beta2: float, max_norm: float | None
) -> dict[str, AdamPrediction]:
    """Adam's moments of the recorded parameters stored as residuals of a replayed AdamW update
    (as :func:`wordystore.adam_predictions` does for the seed's), for a run recorded every step.

    Parameters
    ----------
    kinds : mapping
        The store's kinds (:func:`kinds_for`).
    beta1, beta2 : float
        The optimizer's betas.
    max_norm : float or None
        The gradient clipping's maximum norm (None: no clipping).

    Returns
    -------
    dict
        A prediction for each moment whose dtype the format's predictions cover; the others'
        moments are stored plain, exactly as recorded (residuals are lossless, but where the
        format predicts nothing for a dtype, nothing is made up).

    >>> kinds = kinds_for(["lm_head.weight"], 1000, model=model)  # doctest: +SKIP
    >>> wordystore.create(path, kinds, predictions=predictions_for(kinds, 0.9, 0.999, 1.0))  # doctest: +SKIP
    """
    predictions = {}
    for name in kinds:
        _, grad, exp_avg, exp_avg_sq = kind_names(name)
        if not {grad, exp_avg, exp_avg_sq} <= set(kinds):
            continue  # not a recorded parameter
        moments = {
            exp_avg: AdamPrediction("exp_avg", grad, "grad_norm", beta1, max_norm),
            exp_avg_sq: AdamPrediction("exp_avg_sq", grad, "grad_norm", beta2, max_norm),
        }
        try:
            check_predictions(moments, dict(kinds))
        except ValueError:
            continue  # a dtype the format predicts nothing for
        predictions.update(moments)
    return predictions


def _dims(shape: torch.Size, vocab_size: int | None) -> tuple[str, ...] | None:
    if vocab_size is None or len(shape) == 0 or shape[0] != vocab_size:
        return None  # dim_0, dim_1, ...
    return ("token", "dim", *(f"dim_{i}" for i in range(2, len(shape))))[: len(shape)]


class ParameterRecorder:
    """Records named parameters, their gradients and Adam's moments, the loss and a logits sample.

    Parameters
    ----------
    writer : TrajectoryWriter or None
        The store's writer, created with :func:`kinds_for` of the same parameters; None on the
        ranks of a distributed run that do not write (every rank records: they take part in
        averaging the loss; rank 0 writes).
    model : torch.nn.Module
        Watched through a forward hook for ``loss`` and ``logits`` (its output must carry them, as
        Hugging Face models' outputs do), and through its parameters' gradient hooks.
    parameters : mapping or sequence
        What to record, by object or by name in ``model`` (:func:`named_parameters`).
    record_every : int
        Write every ``record_every`` steps (and a run's last step, whatever its number).

    Each step: backward (the recorder keeps the gradients as backward leaves them, after any
    all-reduce), clipping, ``after_clipping``, the optimizer step, then ``record_step``.
    """

    def __init__(
        self, writer: TrajectoryWriter | None, model: torch.nn.Module, parameters, record_every: int = 1
    ) -> None:
        if record_every < 1:
            raise ValueError(f"record_every must be >= 1, got {record_every}")
        self.writer, self.record_every = writer, record_every
        self.parameters = named_parameters(parameters, model)
        self._names = {param: name for name, param in self.parameters.items()}
        self._seen: dict[torch.Tensor, None] = {}  # parameters whose gradient arrived, in order
        self._grads: dict[str, torch.Tensor] = {}
        self._grad_sq: dict[torch.Tensor, torch.Tensor] = {}
        self._backward_queued = False
        self._loss = self._logits = None
        self.last_loss = math.nan
        self._hooks = [model.register_forward_hook(self._on_forward)]
        for param in model.parameters():
            if param.requires_grad:
                self._hooks.append(param.register_post_accumulate_grad_hook(self._on_grad))

    # hooks --------------------------------------------------------------------------------------

    def _on_forward(self, module, args, output) -> None:
        if module.training and getattr(output, "loss", None) is not None:
            self._loss = output.loss.detach()
            # clone: a view would keep the whole [batch, seq, vocab] logits tensor alive
            self._logits = output.logits[0, -1].detach().clone()

    def _on_grad(self, param: torch.Tensor) -> None:
        self._seen[param] = None
        if not self._backward_queued:
            self._backward_queued = True
            Variable._execution_engine.queue_callback(self._queue_after_backward)

    def _queue_after_backward(self) -> None:
        # Backward's end-of-pass callbacks run in the order queued. DDP queues its own (waiting for
        # the all-reduce and writing the averaged gradients into .grad) after this one, once the
        # last gradient arrived: queued again now, the gradients are read after it.
        Variable._execution_engine.queue_callback(self._after_backward)

    def _after_backward(self) -> None:
        self._backward_queued = False
        for param in self._seen:
            grad = param.grad.detach()
            self._grad_sq[param] = grad.float().pow(2).sum()
            if param in self._names:
                self._grads[self._names[param]] = grad.clone()

    # recording ----------------------------------------------------------------------------------

    def record_initial(self, step: int = 0) -> None:
        """Row ``step`` (0) for the state before training: the parameters, zeros elsewhere, NaN scalars."""
        if self.writer is None:
            return
        tensors = {}
        for name, param in self.parameters.items():
            value, grad, mom, var = kind_names(name)
            tensors[value] = param.detach()
            zeros = torch.zeros(param.shape, dtype=param.dtype)
            tensors.update({grad: zeros, mom: zeros, var: zeros})
        if "logits" in self.writer.kinds:
            logits = self.writer.kinds["logits"]
            tensors["logits"] = torch.zeros(logits.shape, dtype=logits.torch_dtype)
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
        steps, and the ``last`` step of a run whatever its number). Every rank of a distributed run
        calls it at every step."""
        if self._loss is not None:
            self.last_loss = _mean_over_ranks(self._loss)
        if self.writer is None or not self.records(step, last=last):
            return self._reset()
        if self._loss is None:
            raise RuntimeError("no loss seen: the model's forward output carried no .loss during training")
        tensors = {}
        for name, param in self.parameters.items():
            value, grad, mom, var = kind_names(name)
            state = optimizer.state.get(param, {})
            zeros = torch.zeros(param.shape, dtype=param.dtype)
            tensors[value] = param.detach()
            tensors[grad] = self._grads.get(name, zeros)
            tensors[mom] = state["exp_avg"].detach() if "exp_avg" in state else zeros
            tensors[var] = state["exp_avg_sq"].detach() if "exp_avg_sq" in state else zeros
        if "logits" in self.writer.kinds:
            tensors["logits"] = self._logits.to(self.writer.kinds["logits"].torch_dtype)
        tensors["losses"] = torch.tensor(self.last_loss, dtype=self.writer.kinds["losses"].torch_dtype)
        tensors["learning_rate"] = float(lr)
        tensors["grad_norm"] = math.sqrt(sum(n.item() for n in self._grad_sq.values()))
        tensors["grad_norm_clipped"] = float(grad_norm_clipped)
        self.writer.append(step, **tensors)
        self._reset()

    def records(self, step: int, *, last: bool = False) -> bool:
        """Whether step ``step`` gets a row (every ``record_every`` steps, and a run's ``last`` one)."""
        return step % self.record_every == 0 or last

    def _reset(self) -> None:
        self._seen.clear()
        self._grads.clear()
        self._grad_sq.clear()
        self._loss = self._logits = None

    def remove(self) -> None:
        """Take the recorder's hooks off the model."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def _mean_over_ranks(loss: torch.Tensor) -> float:
    """The loss averaged over the ranks of a distributed run (each rank's batch is a part of the
    global one); the loss itself in one process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return loss.item()
    world = torch.distributed.get_world_size()
    if world == 1:
        return loss.item()
    total = loss.to(torch.float64).reshape(1).clone()
    torch.distributed.all_reduce(total)
    return total.item() / world
