"""A plain loop under DDP (gloo, CPU), recorded by rank 0 with a ParameterRecorder:
``python -m torch.distributed.run --standalone --nproc-per-node N tests/ddp_loop.py OUT``.

Every run trains the tiny float32 Llama of test_recording on the same global batches (GLOBAL
sequences a step, each rank its contiguous share), so that one process is the reference of N.
Each rank saves what it saw, beside the store (``OUT.rank<r>.safetensors``): the gradient as the
optimizer takes it (after backward and DDP's all-reduce), the gradient before the all-reduce (its
own hooks), the parameters and Adam's moments after each step, and its own loss.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from test_recording import RECORDED, SEQ, VOCAB, tiny_llama
from torch.nn.parallel import DistributedDataParallel

import wordystore
from wordystore.recording import ParameterRecorder, kinds_for

STEPS, GLOBAL = 6, 8


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_llama()  # the same seed on every rank: the same initial parameters
    params = {name: param for name, param in model.named_parameters() if name in RECORDED}
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    writer = wordystore.create(out, kinds_for(RECORDED, VOCAB, model=model), overwrite=True) if rank == 0 else None
    recorder = ParameterRecorder(writer, model, RECORDED)
    local = {}
    for name, param in params.items():
        param.register_post_accumulate_grad_hook(lambda p, name=name: local.__setitem__(name, p.grad.clone()))
    data = torch.randint(0, VOCAB, (STEPS, GLOBAL, SEQ), generator=torch.Generator().manual_seed(2))
    share = GLOBAL // world
    seen = {}
    recorder.record_initial(0)
    for step in range(1, STEPS + 1):
        ids = data[step - 1, rank * share : (rank + 1) * share]
        loss = ddp(input_ids=ids, labels=ids).loss
        loss.backward()
        for name, param in params.items():
            seen[f"{step}.{name}.grad"] = param.grad.clone()
            seen[f"{step}.{name}.local_grad"] = local[name]
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        clipped = recorder.after_clipping(model.parameters())
        optimizer.step()
        recorder.record_step(step, optimizer, 1e-2, clipped, last=step == STEPS)
        optimizer.zero_grad()
        seen[f"{step}.loss"] = loss.detach().reshape(1)
        for name, param in params.items():
            seen[f"{step}.{name}"] = param.detach().clone()
            seen[f"{step}.{name}.exp_avg"] = optimizer.state[param]["exp_avg"].clone()
            seen[f"{step}.{name}.exp_avg_sq"] = optimizer.state[param]["exp_avg_sq"].clone()
    if writer is not None:
        writer.close()
    save_file(seen, str(Path(f"{out}.rank{rank}.safetensors")))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
