"""wordystore.recording on models other than the seed's: every kind in the parameter's own dtype,
bit for bit against what the test itself saw of the parameters, gradients and optimizer state."""

import numpy as np
import pytest
import torch
import zarr
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

import wordystore
from wordystore import AppendError, Kind
from wordystore.recording import ParameterRecorder, TrajectoryCallback, kinds_for, named_parameters, predictions_for

VOCAB, STEPS, BATCH, SEQ = 1000, 12, 4, 16
RECORDED = ["model.embed_tokens.weight", "lm_head.weight"]


def tiny_llama(dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(dtype)


def batches(n: int) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=generator)
    return [{"input_ids": row, "labels": row} for row in ids]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().view(torch.uint8), b.view(torch.uint8))
    )


class Snapshots(TrainerCallback):
    """The test's own record of each step: the gradients as backward left them (its own hooks), and
    at each step's end the parameters and ``optimizer.state``, cloned."""

    def __init__(self, params: dict):
        self.params, self.grads, self.rows = params, {}, {}
        for name, param in params.items():
            param.register_post_accumulate_grad_hook(lambda p, name=name: self.grads.__setitem__(name, p.grad.clone()))

    def on_train_begin(self, args, state, control, **kwargs):
        self.rows[0] = {name: param.detach().clone() for name, param in self.params.items()}

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        row = {}
        for name, param in self.params.items():
            adam = optimizer.state[param]
            row[name] = param.detach().clone()
            row[f"{name}.grad"] = self.grads[name]
            row[f"{name}.exp_avg"] = adam["exp_avg"].clone()
            row[f"{name}.exp_avg_sq"] = adam["exp_avg_sq"].clone()
        self.rows[state.global_step] = row


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_a_float32_llama_trained_by_the_trainer_is_recorded_bit_for_bit_at_every_step(tmp_path, autocast):
    model = tiny_llama()
    params = named_parameters(RECORDED, model)
    kinds = kinds_for(RECORDED, VOCAB, model=model)
    for name in RECORDED:
        for kind in (name, f"{name}.grad", f"{name}.exp_avg", f"{name}.exp_avg_sq"):
            assert kinds[kind] == Kind((VOCAB, 32), "float32", ("token", "dim")), kind
    # float32 moments are predicted too (int32 residuals of a replayed float32 AdamW update)
    predictions = predictions_for(kinds, 0.9, 0.999, 1.0)
    assert set(predictions) == {f"{name}.{moment}" for name in RECORDED for moment in ("exp_avg", "exp_avg_sq")}
    writer = wordystore.create(tmp_path / "llama.zarr", kinds, predictions=predictions)
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=STEPS,
        per_device_train_batch_size=BATCH,
        learning_rate=1e-2,
        bf16=autocast,
        use_cpu=True,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    snapshots = Snapshots(params)
    with writer:
        recording = TrajectoryCallback(writer, model, RECORDED)
        Trainer(model=model, args=args, train_dataset=batches(STEPS * BATCH), callbacks=[recording, snapshots]).train()

    t = wordystore.open(tmp_path / "llama.zarr")
    assert t.steps.tolist() == list(range(STEPS + 1))
    for name in RECORDED:
        assert same_bits(t[name][0], snapshots.rows[0][name])
        for kind in (f"{name}.grad", f"{name}.exp_avg", f"{name}.exp_avg_sq"):
            assert not t[kind][0].any()
    for step in range(1, STEPS + 1):
        for kind, expected in snapshots.rows[step].items():
            assert same_bits(t[kind][step], expected), f"{kind} at step {step}"
    assert t.logits.dtype == t.losses.dtype == torch.float32
    assert torch.isfinite(t.losses[1:]).all() and (t.grad_norm[1:] > 0).all()
    assert not torch.equal(t[RECORDED[0]][0], t[RECORDED[0]][STEPS])
    # the float32 moments are stored as int32 residuals, and read back above bit for bit
    group = zarr.open_group(tmp_path / "llama.zarr", mode="r")
    for name in RECORDED:
        assert group[f"{name}.exp_avg.residuals"].dtype == np.int32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_plain_loop_records_each_parameter_in_its_own_dtype(tmp_path, dtype):
    """Parameters by object and by name, in a loop of the test's own, against its own snapshots."""
    model = tiny_llama(dtype)
    embeddings, head = model.model.embed_tokens.weight, model.lm_head.weight
    parameters = {"embeddings": embeddings, "head": "lm_head.weight"}
    kinds = kinds_for(parameters, VOCAB, model=model)
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]
    assert {kinds[k].dtype for k in ("embeddings", "grads", "momentum", "variance", "head", "head.exp_avg")} == {name}
    assert kinds["embeddings"].dims == kinds["head.grad"].dims == ("token", "dim")
    # the format predicts the moments of bfloat16 and float32 parameters; float16 ones stay as recorded
    predictions = predictions_for(kinds, 0.9, 0.999, 1.0)
    assert set(predictions) == (
        {"momentum", "variance", "head.exp_avg", "head.exp_avg_sq"} if name != "float16" else set()
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-3)  # eps: float16 moments stay finite
    data = torch.stack([b["input_ids"] for b in batches(4 * 2)]).view(4, 2, SEQ)
    expected = []
    with wordystore.create(tmp_path / "run.zarr", kinds, predictions=predictions, block_rows=2, chunk_rows=2) as w:
        recorder = ParameterRecorder(w, model, parameters)
        recorder.record_initial(0)
        for step, ids in enumerate(data, start=1):
            model(input_ids=ids, labels=ids).loss.backward()
            grads = (embeddings.grad.clone(), head.grad.clone())
            norm = sum(p.grad.double().pow(2).sum().item() for p in model.parameters()) ** 0.5
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            clipped = recorder.after_clipping(model.parameters())
            optimizer.step()
            recorder.record_step(step, optimizer, 1e-2, clipped, last=step == len(data))
            optimizer.zero_grad()
            state = optimizer.state
            expected.append(
                {
                    "embeddings": embeddings.detach().clone(),
                    "grads": grads[0],
                    "momentum": state[embeddings]["exp_avg"].clone(),
                    "variance": state[embeddings]["exp_avg_sq"].clone(),
                    "head": head.detach().clone(),
                    "head.grad": grads[1],
                    "head.exp_avg": state[head]["exp_avg"].clone(),
                    "head.exp_avg_sq": state[head]["exp_avg_sq"].clone(),
                    "grad_norm": norm,
                }
            )
        recorder.remove()
    t = wordystore.open(tmp_path / "run.zarr")
    for step, row in enumerate(expected, start=1):
        for kind, value in row.items():
            if kind == "grad_norm":
                assert t.grad_norm[step].item() == pytest.approx(value, rel=1e-5)
            else:
                assert same_bits(t[kind][step], value), f"{kind} at step {step}"


def test_what_cannot_be_recorded_as_it_is_is_refused(tmp_path):
    model = tiny_llama()
    with pytest.raises(ValueError, match="'lm_head.bias' is not a parameter of the model"):
        kinds_for(["lm_head.bias"], VOCAB, model=model)
    with pytest.raises(ValueError, match="give model="):
        kinds_for([model.lm_head.weight], VOCAB)
    # a float32 parameter into a store that declared bfloat16 is refused, not rounded
    kinds = kinds_for({"head": model.lm_head.weight}, VOCAB)
    kinds = {**kinds, "head": Kind((VOCAB, 32), "bfloat16", ("token", "dim"))}
    with wordystore.create(tmp_path / "bad.zarr", kinds) as writer:
        recorder = ParameterRecorder(writer, model, {"head": model.lm_head.weight})
        with pytest.raises(AppendError, match="kind 'head' expects shape \\(1000, 32\\) and dtype bfloat16"):
            recorder.record_initial(0)
