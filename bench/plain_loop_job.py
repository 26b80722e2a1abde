"""A plain PyTorch loop of the seed model (AdamW, clipping at 1.0), with or without recording every step
through ``wordystore.create`` with Adam predictions; prints the wall seconds of steps 3.. and the writer's
close as a JSON line. ``python -m bench`` runs it as a whole process per mode (``bench_plain_loop``).

    python -m bench.plain_loop_job recording OUT '{"steps": 10, "vocab_size": 8192, "hidden_dim": 16}'
"""

from __future__ import annotations

import json
import sys
import time

import torch

import wordystore
from trainer.config import RunConfig
from trainer.experiment import build_model


def run(mode: str, out: str, cfg: RunConfig) -> float:
    """Train ``cfg.steps`` steps, recording into ``out`` when ``mode`` is ``"recording"``; the seconds
    from the third step's start to the end (the first steps warm caches and allocators), close included."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, cfg.vocab_size, "cpu")
    beta1, beta2 = cfg.adam_beta1, cfg.adam_beta2
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.learning_rate,
        betas=(beta1, beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
        foreach=False,
    )
    wte = model.transformer.wte.weight
    writer = None
    if mode == "recording":
        kinds = wordystore.seed_kinds(cfg.vocab_size, cfg.hidden_dim)
        writer = wordystore.create(out, kinds, predictions=wordystore.adam_predictions(beta1, beta2, 1.0))
    generator = torch.Generator().manual_seed(0)
    began = time.perf_counter()
    for step in range(cfg.steps):
        if step == 2:
            began = time.perf_counter()
        ids = torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.max_seq_len), generator=generator)
        result = model(input_ids=ids, labels=ids)
        result.loss.backward()
        grads = wte.grad.clone() if writer is not None else None
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        optimizer.step()
        if writer is not None:
            state = optimizer.state[wte]
            writer.append(
                step,
                embeddings=wte.detach(),
                grads=grads,
                momentum=state["exp_avg"],
                variance=state["exp_avg_sq"],
                logits=result.logits[0, -1].detach(),
                losses=float(result.loss.detach()),
                learning_rate=cfg.learning_rate,
                grad_norm=norm,
                grad_norm_clipped=min(norm, 1.0),
            )
        optimizer.zero_grad(set_to_none=True)
    if writer is not None:
        writer.close()
    return time.perf_counter() - began


def main() -> None:
    mode, out, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    print(json.dumps({"seconds": run(mode, out, RunConfig(**args))}))


if __name__ == "__main__":
    main()
