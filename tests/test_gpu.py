"""Recording from a GPU: the ring is page-locked, copies into it are asynchronous, and every row the
store holds equals a snapshot of the same tensors taken at the recorder's points. These tests need
CUDA and skip without it (``python -m bench --device cuda`` runs them first on a GPU machine)."""

import numpy as np
import pytest
import torch

import wordystore
from trainer.config import RunConfig
from trainer.experiment import build_model
from wordystore.recording import ParameterRecorder, kinds_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

VOCAB, STEPS = 50257, 40


def train_recorded(path, writer_process: bool):
    """STEPS steps of the seed model on random tokens, recorded; beside each append, a snapshot of
    what it was given, copied on the same stream into memory of its own (synchronised only at the
    end, so that it does not order the writer's copies itself)."""
    cfg = RunConfig(steps=STEPS, batch_size=8, max_seq_len=64, device="cuda")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, VOCAB, "cuda")
    embedding = model.transformer.wte.weight
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    writer = wordystore.create(
        path,
        kinds_for({"embeddings": embedding}, VOCAB, logits_dtype="bfloat16", loss_dtype="bfloat16"),  # the seed's
        predictions=wordystore.adam_predictions(0.9, 0.999, 1.0),
        writer_process=writer_process,
    )
    snapshots, append = [], writer.append

    def append_and_snapshot(step, **tensors):
        append(step, **tensors)
        snapshots.append(
            {
                name: value.detach().to("cpu", non_blocking=True, copy=True)
                if isinstance(value, torch.Tensor)
                else value
                for name, value in tensors.items()
            }
        )

    writer.append = append_and_snapshot
    recorder = ParameterRecorder(writer, model, {"embeddings": embedding})
    recorder.record_initial(0)
    for step in range(1, STEPS + 1):
        tokens = torch.randint(0, VOCAB, (cfg.batch_size, cfg.max_seq_len), device="cuda")
        model(tokens, labels=tokens).loss.backward()
        clipped = recorder.after_clipping(model.parameters())
        optimizer.step()
        recorder.record_step(step, optimizer, cfg.learning_rate, clipped, last=step == STEPS)
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    writer.close()
    return snapshots


@pytest.mark.parametrize("writer_process", [False, True], ids=["threads", "process"])
def test_every_stored_row_equals_a_synchronous_snapshot(tmp_path, writer_process):
    snapshots = train_recorded(tmp_path / "t.zarr", writer_process)
    t = wordystore.open(tmp_path / "t.zarr")
    assert len(t) == STEPS + 1 == len(snapshots)
    differing = [
        (row, name)
        for name in ("embeddings", "grads", "momentum", "variance", "logits")
        for row, stored in enumerate(t[name].numpy(slice(None)))
        if stored.view(np.uint16).tobytes() != snapshots[row][name].view(torch.int16).numpy().tobytes()
    ]
    assert differing == []
    assert t.commit_record.writer["process"] is writer_process


@pytest.mark.parametrize("writer_process", [False, True], ids=["threads", "process"])
def test_the_ring_is_page_locked(tmp_path, writer_process):
    with wordystore.create(tmp_path / "t.zarr", wordystore.seed_kinds(64, 8), writer_process=writer_process) as w:
        assert w._ring.buffer.is_pinned() and w.pools.ring_blocks == 3
