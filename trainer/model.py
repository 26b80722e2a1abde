"""The seed's model: a 2-layer, 2-head, 64-dim GPT-2 in bfloat16, embeddings drawn N(0, 0.02)."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from trainer.config import RunConfig


def pick_device(requested: str | None = None) -> str:
    """cuda, then mps, then cpu: the notebook's order."""
    if requested:
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


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
