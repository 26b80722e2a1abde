"""Matmul numerics of the bfloat16 run, a named and recorded choice: ``wordystore train --bf16-matmul``.

- ``native``: PyTorch's own bf16 kernels. Bit-identical to the seed notebook on the same machine (what
  the fidelity tests use). Fast on GPUs and on CPUs with bf16 units (AVX512-BF16, AMX-BF16, Arm
  BF16); on other CPUs PyTorch's bf16 GEMM falls back to a scalar loop, 10-20x slower.
- ``float32``: every bf16 matrix product of the model (the Conv1D layers' ``addmm``, the tied LM
  head's ``linear``, attention's ``scaled_dot_product_attention`` or ``matmul``), forward and
  backward, is computed from its bf16 operands as float32 GEMMs and rounded once to bf16: the
  gradient of a bf16 weight is the float32 product rounded once, as the output is.
- ``auto`` (the default): ``native`` on GPUs and on CPUs with bf16 units, ``float32`` elsewhere.
  The CPU is judged from what PyTorch reports (``torch.cpu.get_capabilities()``), never from its
  name; ``WORDYSTORE_CPU_BF16=1`` or ``=0`` overrides the answer (to exercise the other path, or to
  benchmark it, on any machine).

How the float32 path works: :class:`Float32Matmuls` is a ``TorchFunctionMode`` that, while the
model's forward runs (:func:`install` wraps ``model.forward``), takes each matrix product whose
operands are bf16 and runs it as ``op(*float32 copies).to(bfloat16)`` with autocast turned off for
the op (CPU autocast would otherwise cast float32 operands back to bf16). Autograd records exactly
that float32 computation, so backward runs the op's own float32 backward on the float32 copies
and rounds each operand's gradient to bf16 once, at the copy's ``ToCopyBackward``. Backward must
run outside autocast, as the Trainer and PyTorch's AMP recipe run it (autocast would cast the float32
GEMMs of backward to bf16); a backward inside autocast is refused rather than silently computed in
bf16. Nothing here draws random numbers or adds parameters, buffers or state: the recording hooks
and the exact-resume state (``trainer.state``) see the same model.

The choice, its reason and the CPU's capabilities go into the store's config (``numerics``);
a resumed or extended run keeps the stored choice (:func:`of_stored_run`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from trainer.config import BF16_MATMUL

ENV = "WORDYSTORE_CPU_BF16"  # "1": treat this CPU as having bf16 units, "0": as having none; unset: detect

# The matrix products the float32 path takes over (functions and Tensor methods, as torch function
# modes see them). ``x @ y`` arrives as Tensor.matmul or Tensor.__matmul__.
PRODUCTS = frozenset(
    {
        F.linear,
        torch.addmm,
        torch.Tensor.addmm,
        torch.mm,
        torch.Tensor.mm,
        torch.matmul,
        torch.Tensor.matmul,
        torch.Tensor.__matmul__,
        torch.Tensor.__rmatmul__,
        torch.bmm,
        torch.Tensor.bmm,
        torch.baddbmm,
        torch.Tensor.baddbmm,
        torch.addbmm,
        torch.Tensor.addbmm,
        torch.einsum,
        F.scaled_dot_product_attention,
    }
)


# -- the CPU ------------------------------------------------------------------------------------------


@functools.cache
def detected_cpu() -> dict:
    """What PyTorch reports about this CPU: ``torch.cpu.get_capabilities()`` (cpuinfo), the kernel
    level it dispatches to (``torch.backends.cpu.get_cpu_capability()``) and whether oneDNN takes
    its bf16 GEMMs. ``bf16_units``: instructions that multiply bf16 (x86: AVX512-BF16 or AMX-BF16;
    Arm: BF16 or SVE-BF16)."""
    caps = dict(torch.cpu.get_capabilities()) if hasattr(torch.cpu, "get_capabilities") else {}
    arch = str(caps.get("architecture") or platform.machine())

    def flag(name: str, fallback: str | None = None) -> bool:  # older torch: its torch.cpu._is_*_supported()
        if name in caps:
            return bool(caps[name])
        return bool(fallback and hasattr(torch.cpu, fallback) and getattr(torch.cpu, fallback)())

    info = {
        "name": caps.get("cpu_name") or platform.processor() or None,
        "architecture": arch,
        "kernels": torch.backends.cpu.get_cpu_capability(),
        "cores": caps.get("num_physical_cores") or os.cpu_count(),
        "avx2": flag("avx2", "_is_avx2_supported"),
        "avx512": flag("avx512_f", "_is_avx512_supported"),
        "avx512_bf16": flag("avx512_bf16", "_is_avx512_bf16_supported"),
        "amx_bf16": flag("amx_bf16", "_is_amx_tile_supported"),
        "arm_bf16": flag("bf16") or flag("sve_bf16"),
    }
    try:
        info["onednn_bf16"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        info["onednn_bf16"] = False
    info["bf16_units"] = info["avx512_bf16"] or info["amx_bf16"] or info["arm_bf16"]
    info["class"] = cpu_class(info)
    return info


def cpu_class(info: dict) -> str:
    """A CPU class by its bf16 capability: ``amx-bf16``, ``avx512-bf16``, ``arm-bf16`` (bf16 units);
    ``avx512``, ``avx2``, ``arm``, ``basic`` (none)."""
    if info["amx_bf16"]:
        return "amx-bf16"
    if info["avx512_bf16"]:
        return "avx512-bf16"
    if info["arm_bf16"]:
        return "arm-bf16"
    if info["avx512"]:
        return "avx512"
    if info["avx2"]:
        return "avx2"
    return "arm" if info["architecture"] in ("aarch64", "arm64") else "basic"


def forced_bf16_units() -> bool | None:
    """``WORDYSTORE_CPU_BF16``: True for "1", False for "0", None when unset or empty."""
    value = os.environ.get(ENV, "").strip()
    if value in ("", "0", "1"):
        return None if value == "" else value == "1"
    raise ValueError(f"{ENV}={value!r}: expected 1 (this CPU has bf16 units), 0 (it has none) or unset (detect)")


def cpu() -> dict:
    """:func:`detected_cpu`, with ``WORDYSTORE_CPU_BF16`` applied: ``bf16_units`` is the answer
    ``auto`` uses, ``forced`` names the variable's setting (None: detected), ``description`` says
    both in words (``class`` stays the detected class)."""
    info = dict(detected_cpu())
    forced = forced_bf16_units()
    info["forced"] = None if forced is None else f"{ENV}={int(forced)}"
    if forced is not None:
        info["bf16_units"] = forced
    info["description"] = describe_cpu(info)
    return info


def describe_cpu(info: dict) -> str:
    """``avx2 (AVX2, no AVX512-BF16, no AMX-BF16, 2 cores)``, and what a forced answer says."""
    if info["architecture"] in ("aarch64", "arm64"):
        units = f"{'' if info['arm_bf16'] else 'no '}BF16"
    else:
        vector = "AVX-512" if info["avx512"] else "AVX2" if info["avx2"] else "no AVX2"
        units = (
            f"{vector}, {'' if info['avx512_bf16'] else 'no '}AVX512-BF16, {'' if info['amx_bf16'] else 'no '}AMX-BF16"
        )
    text = f"{info['class']} ({units}, {info['cores']} cores)"
    if info.get("forced"):
        text += f", treated as {'having bf16 units' if info['bf16_units'] else 'having none'} ({info['forced']})"
    return text


# -- the choice ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Choice:
    """The matmul numerics a run uses (``bf16_matmul``: native or float32), what was asked for
    (``requested``), why (``reason``) and the CPU it was chosen on."""

    bf16_matmul: str
    requested: str
    reason: str
    device: str
    cpu: dict

    def record(self) -> dict:
        """The store's ``config["numerics"]``."""
        return {
            "bf16_matmul": self.bf16_matmul,
            "requested": self.requested,
            "reason": self.reason,
            "means": BF16_MATMUL[self.bf16_matmul],
            "device": self.device,
            "cpu": self.cpu,
            "torch": torch.__version__,
        }


def choose(requested: str, device: str) -> Choice:
    """Resolve ``--bf16-matmul`` (auto, native, float32) for a new run on ``device``."""
    if requested not in BF16_MATMUL:
        raise ValueError(f"bf16_matmul must be one of {', '.join(BF16_MATMUL)}, got {requested!r}")
    info = cpu()
    kind = device.split(":")[0]
    if requested != "auto":
        return Choice(requested, requested, f"asked for with --bf16-matmul {requested}", device, info)
    if kind != "cpu":
        return Choice("native", "auto", f"auto: on a GPU ({kind}) PyTorch's bf16 kernels are fast", device, info)
    said = f"{info['forced']} says " if info["forced"] else ""
    if info["bf16_units"]:
        return Choice("native", "auto", f"auto: {said}this CPU has bf16 units", device, info)
    return Choice(
        "float32",
        "auto",
        f"auto: {said}this CPU has no bf16 units, where PyTorch's own bf16 GEMM is a slow scalar loop",
        device,
        info,
    )


def stored(config: dict) -> str:
    """The numerics a stored run used: its ``numerics`` record, or ``native`` for a store recorded
    before the choice existed (native was all there was)."""
    return (config.get("numerics") or {}).get("bf16_matmul", "native")


def check_given(config: dict, given: str | None) -> None:
    """On resume or extension: a ``--bf16-matmul`` given again must be ``auto`` or the run's own."""
    if given not in (None, "auto", stored(config)):
        raise ValueError(
            f"the run was recorded with --bf16-matmul {stored(config)} (given {given}); a run keeps "
            "its matmul numerics: leave the flag out, or start a new run"
        )


def of_stored_run(config: dict, device: str) -> Choice:
    """A resumed or extended run's choice: the stored one, whatever ``auto`` would pick here now."""
    record, info = config.get("numerics"), cpu()
    chosen = stored(config)
    reason = (
        f"kept from the run, which recorded: {record['reason']}"
        if record
        else "kept from the run, recorded before the choice existed, when native was all there was"
    )
    if device.split(":")[0] == "cpu" and chosen == "native" and not info["bf16_units"]:
        reason += "; this CPU has no bf16 units, so native runs slowly here"
    return Choice(chosen, "stored", reason, device, info)


# -- the float32 path ---------------------------------------------------------------------------------


class _RoundOnce(torch.autograd.Function):
    """``x.to(bfloat16)`` of a float32 product; its backward refuses to run inside autocast, which
    would cast the float32 GEMMs of the product's backward to bf16."""

    @staticmethod
    def forward(ctx, x):
        ctx.device_type = x.device.type
        return x.to(torch.bfloat16)

    @staticmethod
    def backward(ctx, grad):
        if torch.is_autocast_enabled(ctx.device_type):
            raise RuntimeError(
                "the float32 matmul path's backward ran inside autocast, which would compute its "
                "GEMMs in bf16; call backward outside the autocast region (as the Trainer does)"
            )
        return grad.to(torch.float32)


def _operands(args, kwargs):
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):  # einsum's operands
            yield from (v for v in value if isinstance(v, torch.Tensor))


def _to_float32(value, as_autocast: bool):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return (value.to(torch.bfloat16) if as_autocast else value).to(torch.float32)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_float32(v, as_autocast) for v in value)
    return value


class Float32Matmuls(TorchFunctionMode):
    """While active, every matrix product (:data:`PRODUCTS`) with a bf16 operand is computed in
    float32 and rounded once to bf16: when all its floating operands are bf16, or when bf16 autocast
    is on for their device (which would run the product in bf16; float32 operands are then rounded
    to bf16 first, as autocast would). Other calls, and products given ``out=``, run unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in PRODUCTS or "out" in kwargs:
            return func(*args, **kwargs)
        floats = [t for t in _operands(args, kwargs) if t.is_floating_point()]
        if not any(t.dtype == torch.bfloat16 for t in floats):
            return func(*args, **kwargs)
        device = floats[0].device.type
        autocast = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16
        if not autocast and any(t.dtype != torch.bfloat16 for t in floats):
            return func(*args, **kwargs)  # mixed dtypes outside autocast: PyTorch's own answer (an error)
        with torch.autocast(device, enabled=False):
            out = func(*_to_float32(args, autocast), **{k: _to_float32(v, autocast) for k, v in kwargs.items()})
        return _RoundOnce.apply(out)


def installed(model: torch.nn.Module) -> str:
    """``float32`` if :func:`install` put the float32 path on ``model``, else ``native``."""
    return getattr(model, "_wordystore_bf16_matmul", "native")


def install(model: torch.nn.Module, choice: Choice | str) -> torch.nn.Module:
    """Make ``model`` compute with the chosen numerics; returns it. ``float32``: its ``forward`` runs
    under :class:`Float32Matmuls` (an instance attribute wrapping the bound forward, signature kept,
    as accelerate wraps it for autocast); ``native`` leaves it untouched."""
    matmul = choice.bf16_matmul if isinstance(choice, Choice) else choice
    if matmul not in ("native", "float32"):
        raise ValueError(f"install: expected native or float32 (resolve auto with choose), got {matmul!r}")
    if matmul == "native" or installed(model) == "float32":
        return model
    inner = model.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        with Float32Matmuls():
            return inner(*args, **kwargs)

    model.forward = forward
    model._wordystore_bf16_matmul = "float32"
    return model


# -- what to expect ----------------------------------------------------------------------------------


def first_line(choice: Choice, seconds: float | None, steps_left: int = 0) -> str:
    """The run's first printed line: the numerics, why, the CPU, and the time per step to expect
    (``seconds``: a real step's, timed; None where the run has too few steps to time one)."""
    line = f"bf16 matmul: {choice.bf16_matmul} ({choice.reason}); CPU {choice.cpu['description']}"
    if seconds is not None:
        line += f". Expect about {seconds:.2g} s per step, as this run's second step took"
        if steps_left:
            left = "the step left" if steps_left == 1 else f"the {steps_left} steps left"
            line += f": about {duration(seconds * steps_left)} for {left}"
    return line


def duration(seconds: float) -> str:
    """``12 s``, ``4 min 5 s``, ``1 h 2 min``: a time to expect, as a person says it."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
