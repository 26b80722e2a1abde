"""A training run's full state as safetensors-ready tensors plus JSON: nothing pickled.

:func:`capture` takes everything a Hugging Face ``Trainer`` run needs to go on from a step boundary
bit for bit: the model's parameters, the optimizer's per-parameter state (Adam's moments and step
counts) and param groups, the LR scheduler, every RNG (python, numpy, torch CPU and CUDA) and the
``TrainerState`` (global step, epoch: the position in the data order). The ``restore_*`` functions
put each part back::

    tensors, info = capture(trainer)                 # dict[str, Tensor], JSON-serialisable dict
    restore_model(model, tensors)
    restore_optimizer(optimizer, tensors, info)
    restore_rng(tensors, info)

The data order needs no state of its own: the Trainer's sampler draws epoch ``e``'s permutation
from ``seed + e`` (accelerate's ``SeedableRandomSampler``), and ``info["data"]`` records where in
it the run stands.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random

import numpy as np
import torch

FORMAT_VERSION = 1


def capture(trainer) -> tuple[dict[str, torch.Tensor], dict]:
    """The state of ``trainer`` (a ``transformers.Trainer`` between two steps), copied to the CPU."""
    tensors: dict[str, torch.Tensor] = {}
    model = trainer.accelerator.unwrap_model(trainer.model)
    for name, param in model.named_parameters():  # a tied weight appears once
        tensors[f"model.{name}"] = _copy(param)
    optimizer = trainer.optimizer.state_dict()
    for index, param_state in optimizer["state"].items():
        for key, value in param_state.items():
            tensors[f"optimizer.{index}.{key}"] = _copy(value)
    rng_tensors, rng_info = rng_state()
    tensors.update(rng_tensors)
    state = trainer.state
    info = jsonable(
        {
            "format_version": FORMAT_VERSION,
            "global_step": state.global_step,
            "optimizer": {"param_groups": optimizer["param_groups"]},
            "lr_scheduler": trainer.lr_scheduler.state_dict(),
            "rng": rng_info,
            "data": {
                "epoch": math.floor(state.epoch),
                "samples_seen": state.global_step * trainer.args.train_batch_size,
            },
            "trainer_state": dataclasses.asdict(state),
        }
    )
    return tensors, info


def restore_model(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy the captured parameters into ``model`` (same architecture), in place."""
    params = dict(model.named_parameters())
    stored = {name[len("model.") :] for name in tensors if name.startswith("model.")}
    if stored != set(params):
        raise ValueError(
            f"the saved state's parameters do not match the model: missing {sorted(set(params) - stored)}, "
            f"unexpected {sorted(stored - set(params))}"
        )
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[f"model.{name}"])


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], info: dict) -> None:
    """Load the captured per-parameter state and param groups (learning rates included) into ``optimizer``."""
    current = optimizer.state_dict()
    saved_groups = info["optimizer"]["param_groups"]
    if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in current["param_groups"]]:
        raise ValueError("the saved optimizer state has different parameter groups than the optimizer")
    groups = []
    for saved, group in zip(saved_groups, current["param_groups"]):
        # JSON turned tuples (Adam's betas) into lists: give each value the type it has in a fresh optimizer
        groups.append({k: tuple(v) if isinstance(group.get(k), tuple) else v for k, v in saved.items()})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value.clone()  # the optimizer updates its state in place
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Every global RNG's state: python's, numpy's, torch's CPU generator and each CUDA device's."""
    version, keys, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for device, value in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{device}"] = value
    info = {
        "python": {"version": version, "keys": list(keys), "gauss": gauss},
        "numpy": {
            "keys": np_keys.tolist(),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    return tensors, info


def restore_rng(tensors: dict[str, torch.Tensor], info: dict) -> None:
    """Set every global RNG to the captured state (the inverse of :func:`rng_state`)."""
    py, npy = info["rng"]["python"], info["rng"]["numpy"]
    random.setstate((py["version"], tuple(py["keys"]), py["gauss"]))
    np.random.set_state(("MT19937", np.array(npy["keys"], dtype=np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"]))
    torch.set_rng_state(tensors["rng.torch_cpu"])
    devices = info["rng"]["cuda_devices"]
    if devices:
        if torch.cuda.device_count() != devices:
            raise ValueError(
                f"the saved state has RNG states for {devices} CUDA devices; "
                f"this machine has {torch.cuda.device_count()}"
            )
        torch.cuda.set_rng_state_all([tensors[f"rng.cuda.{d}"] for d in range(devices)])


def _copy(value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"expected a tensor in the optimizer state, got {type(value).__name__}")
    return value.detach().to("cpu", copy=True)


def jsonable(value):
    """A JSON-safe copy of ``value``: enums and paths as strings, non-finite floats as strings."""

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    return clean(json.loads(json.dumps(value, default=str)))
