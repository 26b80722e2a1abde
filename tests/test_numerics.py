"""trainer.numerics: the float32 path against a float32 reference rounded once, forward and backward,
bit for bit; native untouched; auto's detection and its environment variable; the choice recorded,
shown, and kept by resume and extension."""

import inspect
import json
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load, save
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback
from transformers.pytorch_utils import Conv1D

from trainer import numerics
from trainer import state as run_state
from trainer.config import RunConfig
from trainer.experiment import TokenDataset, build_model
from trainer.run import SeedTrainer, checkpoint_directory, extend, resume, train, training_arguments
from wordystore import trajectory
from wordystore.analysis import report
from wordystore.cli import main as cli_main
from wordystore.read import display

BF16 = torch.bfloat16
TINY = dict(vocab_size=300, hidden_dim=8, batch_size=4, max_seq_len=16)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def bf16(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(BF16).requires_grad_()


# Each case: the op, and its bf16 inputs (the first ones require grad). Sizes long enough that a
# bf16 accumulation would differ from a float32 one.
CASES = {
    "linear (the tied LM head)": (lambda x, w: F.linear(x, w), lambda: (bf16(3, 5, 96, seed=1), bf16(40, 96, seed=2))),
    "linear with bias": (F.linear, lambda: (bf16(7, 96, seed=1), bf16(24, 96, seed=2), bf16(24, seed=3))),
    "addmm (GPT-2's Conv1D)": (torch.addmm, lambda: (bf16(24, seed=3), bf16(7, 96, seed=1), bf16(96, 24, seed=2))),
    "matmul 4-d (eager attention)": (torch.matmul, lambda: (bf16(2, 2, 9, 64, seed=1), bf16(2, 2, 64, 9, seed=2))),
    "@": (lambda a, b: a @ b, lambda: (bf16(9, 64, seed=1), bf16(64, 5, seed=2))),
    "bmm": (torch.bmm, lambda: (bf16(3, 9, 64, seed=1), bf16(3, 64, 5, seed=2))),
    "scaled_dot_product_attention, causal": (
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        lambda: (bf16(2, 2, 16, 32, seed=1), bf16(2, 2, 16, 32, seed=2), bf16(2, 2, 16, 32, seed=3)),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("autocast", [True, False], ids=["in autocast", "no autocast"])
def test_float32_path_is_a_float32_reference_rounded_once_forward_and_backward(name, autocast):
    op, make = CASES[name]
    inputs = make()
    grad = bf16(*op(*[x.detach() for x in inputs]).shape, seed=9).detach()

    with torch.autocast("cpu", dtype=BF16, enabled=autocast), numerics.Float32Matmuls():
        out = op(*inputs)
    out.backward(grad)  # outside autocast, as the Trainer does

    reference_inputs = [x.detach().float().requires_grad_() for x in inputs]
    reference = op(*reference_inputs)
    reference.backward(grad.float())
    assert out.dtype == BF16
    assert torch.equal(bits(out), bits(reference.to(BF16))), "forward"
    for i, (x, r) in enumerate(zip(inputs, reference_inputs)):
        assert x.grad.dtype == BF16
        assert torch.equal(bits(x.grad), bits(r.grad.to(BF16))), f"gradient of input {i}"


def test_other_calls_and_non_bf16_products_are_left_alone():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with numerics.Float32Matmuls():
        assert torch.equal(a @ b, torch.matmul(a, b))  # float32 operands: nothing to do
        out = torch.empty(4, 3, dtype=BF16)
        torch.mm(a.to(BF16), b.to(BF16), out=out)  # out= given: PyTorch's own kernel
        y = torch.tanh(a.to(BF16))
    assert torch.equal(out, torch.mm(a.to(BF16), b.to(BF16))) and y.dtype == BF16


def test_a_backward_inside_autocast_is_refused_not_silently_bf16():
    x, w = CASES["linear (the tied LM head)"][1]()
    with torch.autocast("cpu", dtype=BF16):
        with numerics.Float32Matmuls():
            out = F.linear(x, w)
        with pytest.raises(RuntimeError, match="backward ran inside autocast"):
            out.sum().backward()


class ProductDtypes(TorchDispatchMode):
    """The dtypes of the operands of every ATen matrix product (forward and backward)."""

    PRODUCTS = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product")

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, set]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name.startswith(self.PRODUCTS):
            dtypes = {a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()}
            self.seen.append((name, dtypes))
        return func(*args, **(kwargs or {}))


def tiny_gpt2(attention: str, matmul: str) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=300,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
    )
    config._attn_implementation = attention
    return numerics.install(GPT2LMHeadModel(config).to(BF16), matmul)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("matmul", ["float32", "native"])
def test_every_matrix_product_of_gpt2_runs_in_float32_forward_and_backward(attention, matmul):
    model = tiny_gpt2(attention, matmul)
    ids = torch.arange(32).remainder(300).view(2, 16)
    with ProductDtypes() as products:
        with torch.autocast("cpu", dtype=BF16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    names = {name for name, _ in products.seen}
    assert {"addmm", "mm"} <= names and (names & {"bmm", "_scaled_dot_product_flash_attention_for_cpu"}), names
    if matmul == "float32":
        assert all(dtypes == {torch.float32} for _, dtypes in products.seen), products.seen
    else:  # PyTorch's own: bf16 operands (and the float32 log-sum-exp that flash attention's backward takes)
        assert all(BF16 in dtypes for _, dtypes in products.seen), products.seen
    for param in model.parameters():  # gradients stay bf16, as the parameters
        assert param.grad is not None and param.grad.dtype == BF16


def test_conv1d_and_the_tied_head_inside_a_model_are_the_reference_rounded_once():
    model = tiny_gpt2("sdpa", "float32")
    conv = model.transformer.h[0].mlp.c_fc
    assert isinstance(conv, Conv1D)
    seen = {}
    model.lm_head.register_forward_hook(lambda m, args, out: seen.update(head=(args[0].detach(), out)))
    conv.register_forward_hook(lambda m, args, out: seen.update(conv=(args[0].detach(), out.detach())))
    ids = torch.arange(32).remainder(300).view(2, 16)
    with torch.autocast("cpu", dtype=BF16):
        model(input_ids=ids)
    x, out = seen["conv"]
    expected = torch.addmm(conv.bias.float(), x.float().view(-1, x.shape[-1]), conv.weight.float()).to(BF16)
    assert torch.equal(bits(out.view(-1, out.shape[-1])), bits(expected))
    h, logits = seen["head"]
    grad = bf16(*logits.shape, seed=5).detach()
    logits.backward(grad)
    wte = model.transformer.wte.weight
    assert wte is model.lm_head.weight
    head_grad = (grad.float().reshape(-1, grad.shape[-1]).T @ h.float().reshape(-1, h.shape[-1])).to(BF16)
    unused = slice(32, None)  # rows of tokens not in the input: the head's gradient alone reaches them
    assert torch.equal(bits(wte.grad[unused]), bits(head_grad[unused]))
    assert torch.equal(bits(logits), bits(F.linear(h.float(), wte.float()).to(BF16)))


def test_native_leaves_the_model_untouched_and_float32_keeps_the_forward_signature():
    model = tiny_gpt2("sdpa", "native")
    assert "forward" not in model.__dict__ and numerics.installed(model) == "native"
    numerics.install(model, "float32")
    numerics.install(model, "float32")  # once is enough
    assert numerics.installed(model) == "float32"
    # the Trainer reads the forward's signature to pick the dataset's columns
    assert inspect.signature(model.forward) == inspect.signature(GPT2LMHeadModel.forward.__get__(model))
    with pytest.raises(ValueError, match="resolve auto"):
        numerics.install(model, "auto")


# -- detection -----------------------------------------------------------------------------------------


def test_auto_follows_the_cpu_and_the_environment_variable_forces_it(monkeypatch):
    monkeypatch.setenv(numerics.ENV, "0")
    choice = numerics.choose("auto", "cpu")
    assert choice.bf16_matmul == "float32" and not choice.cpu["bf16_units"]
    assert choice.cpu["forced"] == "WORDYSTORE_CPU_BF16=0" and "WORDYSTORE_CPU_BF16=0 says" in choice.reason
    monkeypatch.setenv(numerics.ENV, "1")
    assert numerics.choose("auto", "cpu").bf16_matmul == "native"
    assert numerics.choose("auto", "cuda:0").bf16_matmul == "native"  # a GPU, whatever the CPU
    monkeypatch.setenv(numerics.ENV, "0")
    assert numerics.choose("auto", "cuda").bf16_matmul == "native"
    assert numerics.choose("native", "cpu").bf16_matmul == "native"  # asked for: as asked
    assert numerics.choose("float32", "cuda").bf16_matmul == "float32"
    monkeypatch.setenv(numerics.ENV, "yes")
    with pytest.raises(ValueError, match="WORDYSTORE_CPU_BF16='yes': expected 1"):
        numerics.choose("auto", "cpu")
    monkeypatch.delenv(numerics.ENV)
    detected = numerics.detected_cpu()
    assert numerics.choose("auto", "cpu").bf16_matmul == ("native" if detected["bf16_units"] else "float32")
    with pytest.raises(ValueError, match="bf16_matmul must be one of auto, native, float32"):
        numerics.choose("fast", "cpu")


@pytest.mark.parametrize(
    "flags, expected",
    [
        (dict(amx_bf16=True, avx512_bf16=True, avx512=True, avx2=True), "amx-bf16"),
        (dict(avx512_bf16=True, avx512=True, avx2=True), "avx512-bf16"),
        (dict(avx512=True, avx2=True), "avx512"),
        (dict(avx2=True), "avx2"),
        (dict(arm_bf16=True, architecture="aarch64"), "arm-bf16"),
        (dict(architecture="aarch64"), "arm"),
    ],
)
def test_cpu_classes_from_what_pytorch_reports(flags, expected):
    info = {
        "amx_bf16": False,
        "avx512_bf16": False,
        "arm_bf16": False,
        "avx512": False,
        "avx2": False,
        "architecture": "x86_64",
        **flags,
    }
    assert numerics.cpu_class(info) == expected


def test_detection_reads_pytorch_not_the_cpu_name():
    info = numerics.detected_cpu()
    caps = torch.cpu.get_capabilities()
    assert info["avx512_bf16"] == bool(caps.get("avx512_bf16")) and info["amx_bf16"] == bool(caps.get("amx_bf16"))
    assert info["kernels"] == torch.backends.cpu.get_cpu_capability()
    assert info["bf16_units"] == (info["avx512_bf16"] or info["amx_bf16"] or info["arm_bf16"])


# -- in the trainer ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def float32_run(tmp_path_factory):
    """A tiny run with auto's detection forced to "no bf16 units": auto picks float32."""
    path = tmp_path_factory.mktemp("f32") / "run.zarr"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(numerics.ENV, "0")
        train(path, RunConfig(steps=4, **TINY), progress=False)
    return path


def test_the_choice_its_reason_and_the_cpu_are_recorded_and_shown(float32_run, tmp_path, capsys):
    t = trajectory.open(float32_run)
    record = t.config["numerics"]
    assert record["bf16_matmul"] == "float32" and record["requested"] == "auto"
    assert record["reason"].startswith("auto: WORDYSTORE_CPU_BF16=0 says this CPU has no bf16 units")
    assert {"class", "avx2", "avx512_bf16", "amx_bf16", "kernels", "bf16_units", "forced"} <= set(record["cpu"])
    assert t.config["run"]["bf16_matmul"] == "auto"
    line = "numerics: bf16 matmul float32 (auto: WORDYSTORE_CPU_BF16=0 says this CPU has no bf16 units"
    assert line in display.info_text(t)
    assert cli_main(["info", str(float32_run)]) == 0
    assert line in capsys.readouterr().out
    assert (t.grads[1] != 0).any()  # the recording hooks saw the float32 path's gradients
    text = report.Comparison.of([report.Run("a", t, curves={}), report.Run("b", t, curves={})]).text()
    assert text.splitlines()[0].endswith(display.numerics_line(record))


def test_the_first_line_names_the_choice_and_the_time_a_real_step_took(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(numerics.ENV, "1")
    train(tmp_path / "n.zarr", RunConfig(steps=3, **TINY), progress=False, announce=True)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1  # printed once, after the second step, and nothing else without a bar
    first = lines[0]
    assert first.startswith("bf16 matmul: native (auto: WORDYSTORE_CPU_BF16=1 says this CPU has bf16 units); CPU ")
    assert re.search(
        r"\. Expect about [\d.e+-]+ s per step, as this run's second step took: about \d+ s for the step left$", first
    )
    assert trajectory.open(tmp_path / "n.zarr").config["numerics"]["bf16_matmul"] == "native"
    train(tmp_path / "one.zarr", RunConfig(steps=1, **TINY), progress=False, announce=True)  # no second step to time
    assert capsys.readouterr().out.splitlines() == [first.split(". Expect")[0]]
    assert [numerics.duration(s) for s in (12.4, 245, 3720)] == ["12 s", "4 min 5 s", "1 h 2 min"]


def test_resume_and_extend_keep_the_stored_choice_and_refuse_another(float32_run, tmp_path, capsys, monkeypatch):
    path = tmp_path / "ext.zarr"
    shutil.copytree(float32_run, path)
    monkeypatch.setenv(numerics.ENV, "1")  # auto would pick native now
    with pytest.raises(ValueError, match="recorded with --bf16-matmul float32 \\(given native\\)"):
        extend(path, 6, "hold", overrides={"bf16_matmul": "native"})
    with pytest.raises(ValueError, match="recorded with --bf16-matmul float32"):
        resume(path, overrides={"bf16_matmul": "native"})
    extend(path, 6, "hold", overrides={"bf16_matmul": "auto"}, progress=False, announce=True)
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("bf16 matmul: float32 (kept from the run, which recorded: auto: WORDYSTORE_CPU_BF16=0")
    assert trajectory.open(path).config["numerics"]["bf16_matmul"] == "float32"
    # a store from before the choice existed goes on with native, the only numerics there were
    assert numerics.of_stored_run({"run": {}}, "cpu").bf16_matmul == "native"
    numerics.check_given({"run": {}}, "native")
    with pytest.raises(ValueError, match="recorded with --bf16-matmul native"):
        numerics.check_given({"run": {}}, "float32")


def test_a_bad_flag_value_is_refused_up_front(tmp_path, capsys):
    assert cli_main(["train", str(tmp_path / "x.zarr"), "--bf16-matmul", "fast"]) == 2
    assert "argument --bf16-matmul: invalid choice: 'fast'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="bf16_matmul must be one of"):
        RunConfig.from_dict(json.loads('{"bf16_matmul": "fast"}'))
    assert list(tmp_path.iterdir()) == []


def test_the_float32_path_goes_on_bit_for_bit_from_a_saved_state(tmp_path):
    """With the float32 path installed, a run restored from its state (through safetensors + JSON)
    records the same bits as the uninterrupted run: the path adds no state and draws no RNG."""

    cfg = RunConfig(**TINY, steps=12)
    ids = np.random.default_rng(0).integers(0, 300, 80)

    def run(out, resume_state=None):
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        model = numerics.install(build_model(cfg, 300, "cpu"), "float32")
        rows, states = {}, {}

        class Rows(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                rows[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()}
                if state.global_step == 7:
                    tensors, info = run_state.capture(trainer)  # as the store keeps them
                    states[7] = load(save(tensors)), json.loads(json.dumps(info, allow_nan=False))

        args = training_arguments(cfg, str(out / "o"), "cpu")
        checkpoint = None if resume_state is None else checkpoint_directory(out / "resume", resume_state[1])
        trainer = SeedTrainer(
            model=model,
            args=args,
            train_dataset=TokenDataset(torch.tensor(ids), 16),
            callbacks=[Rows()],
            resume_state=resume_state,
        )
        trainer.train(resume_from_checkpoint=checkpoint)
        return rows, states

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    full, states = run(tmp_path / "a")
    resumed, _ = run(tmp_path / "b", resume_state=states[7])
    assert sorted(resumed) == list(range(8, 13))
    for step, row in resumed.items():
        for name, value in row.items():
            assert torch.equal(value, full[step][name]), f"step {step}: {name}"
