"""nnfast.fuse / unfuse on real model families (tiny random configs, nothing downloaded) and plain
Sequential MLPs: nnfast ops really run, numbers and gradients match the unfused model, nothing of
the model is lost (parameter objects, state_dict keys, optimizer), and it survives torch.compile,
pickling and ONNX export."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import nnfast
from helpers import assert_close
from nnfast._backends import chooser
from nnfast.fuse import FusedAway, FusedConv1D, FusedGatedBlock, FusedSequential, activation_of

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def fixed_dispatch(monkeypatch):
    # the fused ops, always (the dispatcher may measure PyTorch faster at these tiny sizes)
    monkeypatch.setattr(chooser, "_mode", "fixed")
    monkeypatch.delenv("NNFAST_BACKEND", raising=False)


class _OpLog(TorchDispatchMode):
    """Records every op dispatched (a dispatch mode routes nnfast through its custom ops)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _count_nnfast(model, **inputs) -> int:
    with torch.no_grad(), _OpLog() as log:
        model(**inputs)
    return sum(op.startswith("nnfast.") for op in log.ops)


# A tiny decoder/encoder config: 32 wide, 2 layers, 4 heads (2 key/value heads), 64 positions.
_SMALL = dict(
    vocab_size=99,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
)
_GQA = dict(_SMALL, num_key_value_heads=2)
_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

# family: (config class, model class, config, input kind, how many pairs fuse must find)
FAMILIES = {
    "bert": ("BertConfig", "BertForMaskedLM", _SMALL, "input_ids", 3),  # + the MLM head transform
    "gpt2": (  # Conv1D c_fc + NewGELUActivation
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, **_TOKENS),
        "input_ids",
        2,
    ),
    "llama": ("LlamaConfig", "LlamaForCausalLM", _GQA, "input_ids", 2),  # act_fn(gate_proj(x))
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_GQA, head_dim=8), "input_ids", 2),
    # one stacked gate_up_proj: nnfast's gated op on the weight as stored
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_GQA, **_TOKENS), "input_ids", 2),
    "t5-gated-gelu": (  # wi_0 + NewGELUActivation
        "T5Config",
        "T5EncoderModel",
        dict(
            vocab_size=99,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            decoder_start_token_id=0,
        ),
        "input_ids",
        2,
    ),
    "clip-text": ("CLIPTextConfig", "CLIPTextModel", dict(_SMALL, **_TOKENS), "input_ids", 2),
    "vit": (  # intermediate per layer; the pooler's dense + tanh
        "ViTConfig",
        "ViTModel",
        dict(_SMALL, image_size=16, patch_size=8, num_channels=3),
        "pixel_values",
        3,
    ),
}


def _inputs(kind: str, dtype=torch.float32):
    torch.manual_seed(1)
    if kind == "input_ids":
        return {"input_ids": torch.randint(0, 99, (2, 7))}
    return {"pixel_values": torch.randn(2, 3, 16, 16, dtype=dtype)}


def _first_tensor(out):
    return out.logits if hasattr(out, "logits") and out.logits is not None else out[0]


def _build(name):
    config_cls, model_cls, cfg, kind, _ = FAMILIES[name]
    torch.manual_seed(0)
    cfg = dict(cfg)
    if config_cls == "ViTConfig":
        cfg.pop("vocab_size"), cfg.pop("max_position_embeddings")
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**cfg))
    return model.eval(), kind


@pytest.mark.parametrize("name", list(FAMILIES))
def test_fuse_family_matches_and_loses_nothing(name):
    model, kind = _build(name)
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    params = dict(model.named_parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # built before fuse: must keep working
    inputs = _inputs(kind)
    assert _count_nnfast(model, **inputs) == 0

    nnfast.fuse(model)
    report = nnfast.fuse_report(model)
    assert len(report.fused) == FAMILIES[name][4], str(report)
    assert _count_nnfast(model, **inputs) >= FAMILIES[name][4]  # the ops really run
    assert list(model.state_dict()) == keys
    assert all(a is b for (_, a), b in zip(model.named_parameters(), params.values()))
    assert [n for n, _ in model.named_parameters()] == list(params)

    # forward and every parameter gradient vs the unfused model, in train mode (the same random
    # state for both: the same dropout masks)
    model.train(), reference.train()
    torch.manual_seed(7)
    out = _first_tensor(model(**inputs))
    torch.manual_seed(7)
    ref = _first_tensor(reference(**inputs))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    for (n, p), (_, r) in zip(model.named_parameters(), reference.named_parameters()):
        if r.grad is None:
            assert p.grad is None, n
            continue
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-4, atol=1e-5, msg=n)

    # AdamW steps agree
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    opt.step(), ref_opt.step()
    for (n, p), (_, r) in zip(model.named_parameters(), reference.named_parameters()):
        # attention key biases have a zero gradient in exact arithmetic (softmax ignores a
        # constant shift), rounding noise in practice, and Adam's step is lr * sign(noise)
        real = r.grad.abs() > 1e-6 if r.grad is not None else torch.ones_like(r, dtype=torch.bool)
        torch.testing.assert_close(p[real], r[real], rtol=1e-4, atol=1e-5, msg=n)

    # unfuse restores plain PyTorch modules holding the same parameters
    nnfast.unfuse(model)
    assert _count_nnfast(model.eval(), **inputs) == 0
    assert all(a is b for (_, a), b in zip(model.named_parameters(), params.values()))
    assert not any(
        isinstance(m, (FusedAway, FusedConv1D, FusedGatedBlock, nnfast.FusedDense))
        for m in model.modules()
    )


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_fuse_family_bfloat16_two_x_rule(name):
    model, kind = _build(name)
    ref64 = copy.deepcopy(model).double()
    plain = copy.deepcopy(model).to(torch.bfloat16)
    model = nnfast.fuse(model.to(torch.bfloat16))
    inputs = _inputs(kind)
    outs = [_first_tensor(m(**inputs)) for m in (model, plain, ref64)]
    assert_close(*[o.detach() for o in outs], f"{name} bf16 logits")
    g = torch.randn_like(outs[2])
    for o in outs:
        o.backward(g.to(o.dtype))
    # the feed-forward weights nnfast runs: gradients under the 2x rule against float64
    names = [n for n, _ in model.named_parameters() if "mlp" in n or "intermediate" in n]
    assert names
    params = [dict(m.named_parameters()) for m in (model, plain, ref64)]
    for n in names:
        assert_close(*[p[n].grad for p in params], f"{name} bf16 grad {n}")


def test_fuse_gpt2_uses_the_conv1d_weight_as_stored():
    model, kind = _build("gpt2")
    weight = model.transformer.h[0].mlp.c_fc.weight
    ptr = weight.data_ptr()
    nnfast.fuse(model)
    fused = model.transformer.h[0].mlp.c_fc
    assert isinstance(fused, FusedConv1D) and fused.weight is weight and weight.data_ptr() == ptr


def test_fuse_leaves_what_it_cannot_prove_and_says_why():
    class ActBeforeDropoutThenElsewhere(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.act = nn.Linear(8, 16), nn.Linear(16, 8), nn.GELU()

        def forward(self, x):  # act is applied to something that is not fc1's output alone
            return self.fc2(self.act(self.fc1(x)) + 1.0) + self.act(x)

    class DropoutBetween(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.drop, self.act = nn.Linear(8, 16), nn.Dropout(0.5), nn.GELU()

        def forward(self, x):
            return self.act(self.drop(self.fc1(x)))

    model = nn.ModuleDict({"a": ActBeforeDropoutThenElsewhere(), "b": DropoutBetween()})
    with pytest.warns(UserWarning, match="nothing was fused"):
        nnfast.fuse(model)
    report = nnfast.fuse_report(model)
    assert len(report.left) == 2 and not report.fused, str(report)
    assert "probe" in str(report)
    # a Sequential with a dropout between Linear and activation is not matched either
    seq = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.ReLU(), nn.Linear(4, 2))
    with pytest.warns(UserWarning):
        nnfast.fuse(seq)
    assert type(seq[0]) is nn.Linear


def test_fuse_sequential_mlp_runs_as_one_mlp_op():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(6, 32), nn.SiLU(), nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, 3))
    ref = copy.deepcopy(seq)
    keys = list(seq.state_dict())
    nnfast.fuse(seq)
    assert type(seq) is FusedSequential and list(seq.state_dict()) == keys
    x = torch.randn(10, 6)
    with torch.no_grad(), _OpLog() as log:
        seq(x)
    assert sum(op.startswith("nnfast.mlp_fwd") for op in log.ops) == 1
    xg = x.clone().requires_grad_()
    out = seq(xg)
    torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    ref(x).sum().backward()
    for p, r in zip(seq.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-5, atol=1e-6)
    # a checkpoint of the plain Sequential loads into the fused one and back
    seq.load_state_dict(ref.state_dict(), strict=True)
    nnfast.unfuse(seq)
    assert type(seq) is nn.Sequential and type(seq[1]) is nn.SiLU


def test_fused_model_compiles_pickles_and_round_trips():
    model, kind = _build("llama")
    nnfast.fuse(model)
    inputs = _inputs(kind)
    want = _first_tensor(model(**inputs))
    again = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(_first_tensor(again(**inputs)), want)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(_first_tensor(loaded(**inputs)), want)
    assert len(nnfast.fuse_report(loaded).fused) == 2
    nnfast.unfuse(loaded)
    torch.testing.assert_close(_first_tensor(loaded(**inputs)), want, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
    whole = torch.compile(model, backend="aot_eager")  # the whole fused model, graph breaks allowed
    torch.testing.assert_close(_first_tensor(whole(**inputs)), want, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
    mlp = model.model.layers[0].mlp
    compiled = torch.compile(mlp, fullgraph=True)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(compiled(x), mlp(x), rtol=1e-5, atol=1e-6)


def test_recognises_activations_by_what_they_compute():
    from transformers.activations import ACT2FN

    expected = {
        "gelu": "gelu",
        "gelu_new": "gelu_tanh",
        "gelu_pytorch_tanh": "gelu_tanh",
        "quick_gelu": "quick_gelu",
        "silu": "silu",
        "relu": "relu",
        "tanh": "tanh",
        "sigmoid": "sigmoid",
        "relu2": "squared_relu",
    }
    for name, row in expected.items():
        spec = activation_of(ACT2FN[name])
        assert spec is not None and spec.name == row, (name, spec)
    assert activation_of(nn.LeakyReLU(0.2)).param == 0.2
    assert activation_of(nn.PReLU()) is None and activation_of(nn.Softplus()) is None


def test_fused_mlp_from_and_to_sequential():
    seq = nn.Sequential(nn.Linear(5, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 2))
    mlp = nnfast.FusedMLP.from_sequential(seq)
    x = torch.randn(7, 5)
    torch.testing.assert_close(mlp(x), seq(x), rtol=1e-5, atol=1e-6)
    back = mlp.to_sequential()
    assert [type(m) for m in back] == [type(m) for m in seq]
    torch.testing.assert_close(back(x), seq(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="expected nn.Sequential"):
        nnfast.FusedMLP.from_sequential(
            nn.Sequential(nn.Linear(2, 2), nn.Dropout(), nn.Linear(2, 2))
        )


def test_fused_models_export_to_onnx_and_run_in_onnxruntime():
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3))
    nnfast.fuse(seq)
    llama, _ = _build("llama")
    block = nnfast.fuse(llama.model.layers[0].mlp)  # a fused transformer feed-forward block
    model = nn.Sequential(
        seq,
        nn.Linear(3, 32),
        block,
        nnfast.FusedDense(32, 8, activation="quick_gelu"),
        nnfast.FusedMLP(8, [16], 2, activation="swiglu"),
    ).eval()
    x = torch.randn(4, 6)
    program = torch.onnx.export(
        model, (x,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},)
    )
    session = ort.InferenceSession(program.model_proto.SerializeToString())
    for batch in (4, 11):  # the batch dimension is dynamic
        xi = torch.randn(batch, 6)
        (got,) = session.run(None, {session.get_inputs()[0].name: xi.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), model(xi).detach(), rtol=1e-5, atol=1e-6)
    # torch.export keeps working: the program holds standard ops and runs without nnfast
    exported = torch.export.export(model, (x,))
    assert not any("nnfast" in str(n.target) for n in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-6)


def test_keras_torch_module_wrapper_saves_and_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "torch")  # read when keras is first imported
    keras = pytest.importorskip("keras")
    assert keras.backend.backend() == "torch"
    inp = keras.Input(shape=(6,))
    layer = keras.layers.TorchModuleWrapper(
        nnfast.FusedMLP(6, [16, 16], 3, activation="gelu"), output_shape=(None, 3)
    )
    model = keras.Model(inp, layer(inp))
    x = torch.randn(5, 6).numpy()
    want = model.predict(x, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    # Keras refuses any torch module in safe mode (its pickle could run code): an explicit opt-in
    loaded = keras.saving.load_model(path, safe_mode=False)
    assert isinstance(loaded.layers[-1].module, nnfast.FusedMLP)
    torch.testing.assert_close(torch.as_tensor(loaded.predict(x, verbose=0)), torch.as_tensor(want))


def test_fuse_bad_input_says_what_it_expected():
    with pytest.raises(TypeError, match="expected an nn.Module, got dict"):
        nnfast.fuse({"layer": nn.Linear(2, 2)})
