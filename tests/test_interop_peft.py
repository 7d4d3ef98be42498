"""Interoperability with the real peft and transformers libraries (DESIGN.md 3, issue 2 item 9).

Each case builds a tiny transformers model from a config (no downloads), lets peft create and save
an adapter with non-zero B (`init_lora_weights=False`), and checks:
- read: loratool's ranks, alphas, scales, kinds, fan_in_fan_out, DoRA magnitudes, extras and dense
  deltas agree with peft's own layer attributes and `get_delta_weight`;
- write: what loratool writes loads with `PeftModel.from_pretrained` without missing or unexpected
  keys and gives the same logits as the peft model that made the adapter.
Expected values always come from peft, never from loratool.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import loratool
from loratool.adapter import Adapter
from loratool.io.tensors import TensorRef
from loratool.maths.delta import delta

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from peft.utils import ModulesToSaveWrapper  # noqa: E402

PREFIX = "base_model.model."
VOCAB = 64


# ---------------------------------------------------------------------------------------------
# tiny models, built from configs with a fixed seed


def _llama(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def _gpt2() -> torch.nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _distilbert() -> torch.nn.Module:
    cfg = transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=32, hidden_dim=48, n_layers=2, n_heads=4, max_position_embeddings=32, num_labels=3,
    )
    torch.manual_seed(0)
    return transformers.DistilBertForSequenceClassification(cfg).eval()


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Case:
    """One peft configuration on one tiny model."""

    id: str
    build: Callable[[], torch.nn.Module]
    lora: dict[str, Any]
    dtype: torch.dtype = torch.float32
    get_peft_kwargs: dict[str, Any] = field(default_factory=dict)


CASES = [
    Case(
        "llama-rslora-patterns-embedding",
        _llama,
        dict(
            r=4, lora_alpha=8, use_rslora=True, target_modules=[*LLAMA_TARGETS, "embed_tokens"],
            # full-path, suffix and regex keys as users write them; the first matching key wins, and
            # "_proj" / "ate_proj" match nothing in peft (a key must cover whole dotted components)
            rank_pattern={"_proj": 1, "model.layers.1.self_attn.q_proj": 2, "q_proj": 3, "v_proj": 6},
            alpha_pattern={"ate_proj": 100, "model.layers.1.self_attn.q_proj": 3, "v_proj": 5,
                           r"mlp\.(up|gate)_proj": 2},
        ),
    ),
    Case("gpt2-fan-in-fan-out", _gpt2,
         dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    Case(
        "distilbert-seqcls-modules-to-save",
        _distilbert,
        dict(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_lin", "v_lin"], modules_to_save=["classifier"]),
    ),
    Case("llama-dora", _llama,
         dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)),
    Case(
        "llama-bf16",
        lambda: _llama(torch.bfloat16),
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
        dtype=torch.bfloat16,
        # keep the adapter in bf16 (peft upcasts adapter weights to float32 by default)
        get_peft_kwargs=dict(autocast_adapter_dtype=False),
    ),
]


@dataclass
class Made:
    """A peft model, the adapter directory it saved, and what is needed to rebuild and compare."""

    case: Case
    model: Any  # PeftModel
    base_state: dict[str, torch.Tensor]
    path: Path
    inputs: torch.Tensor
    logits: torch.Tensor

    def fresh_base(self) -> torch.nn.Module:
        base = self.case.build()
        base.load_state_dict(self.base_state)
        return base

    def layers(self) -> dict[str, Any]:
        """peft's LoRA layers by loratool module name (no `base_model.model.` prefix)."""
        return lora_layers(self.model)


def lora_layers(model: Any) -> dict[str, Any]:
    return {n.removeprefix(PREFIX): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _forward(model: Any, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=inputs).logits


def _make(case: Case, root: Path) -> Made:
    base = case.build()
    base_state = copy.deepcopy(base.state_dict())
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, **case.lora), **case.get_peft_kwargs).eval()
    path = root / case.id
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Setting save_embedding_layers to True ..."
        model.save_pretrained(path)
    inputs = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    return Made(case, model, base_state, path, inputs, _forward(model, inputs))


@pytest.fixture(scope="module", params=CASES, ids=[c.id for c in CASES])
def made(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Made:
    return _make(request.param, tmp_path_factory.mktemp("peft"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Made:
    return _make(CASES[0], tmp_path_factory.mktemp("llama"))


# ---------------------------------------------------------------------------------------------
# helpers that ask peft


def peft_kind(layer: Any) -> str:
    if isinstance(layer, peft.tuners.lora.Embedding):
        return "embedding"
    if isinstance(layer, peft.tuners.lora.layer._ConvNd):
        return "conv"
    return "linear"


def model_tensor(model: Any, key: str) -> torch.Tensor:
    """The live tensor of the peft model a saved full-tensor key (`classifier.weight`) stands for."""
    owner, _, attr = key.rpartition(".")
    module = model.base_model.model.get_submodule(owner)
    if isinstance(module, ModulesToSaveWrapper):
        module = module.modules_to_save["default"]
    return getattr(module, attr)


def assert_same_delta(ours: torch.Tensor, layer: Any, dtype: torch.dtype, *, exact: bool = True) -> None:
    theirs = layer.get_delta_weight("default").detach()
    assert ours.dtype == torch.float32
    assert ours.shape == theirs.shape
    if dtype == torch.float32:
        if exact:
            assert torch.equal(ours, theirs), (ours - theirs).abs().max()
        else:
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    else:
        # peft computes a half-precision delta in float32 on the CPU and casts it back
        assert torch.equal(ours.to(dtype).float(), theirs.float()), (ours - theirs.float()).abs().max()


def load_peft(made: Made, path: Path) -> Any:
    """PeftModel.from_pretrained on a fresh base; fails on any missing/unexpected adapter key."""
    kwargs = dict(made.case.get_peft_kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(made.fresh_base(), path, **kwargs).eval()
    messages = [str(w.message) for w in caught]
    bad = [m for m in messages if "missing adapter keys" in m or "did not match" in m or "no module was matched" in m]
    assert not bad, bad
    # from_pretrained only warns about missing keys; load_adapter returns the full load result
    result = model.load_adapter(path, adapter_name="check", **kwargs)
    assert result.missing_keys == []
    assert result.unexpected_keys == []
    model.delete_adapter("check")
    model.set_adapter("default")
    # the same full-tensor copies (modules_to_save), no more: a wrapper around a LoRA layer's
    # base_layer would make peft train and save a whole extra tensor
    assert wrapped(model) == wrapped(made.model)
    return model


def wrapped(model: Any) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)}


def saved_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return list(f.keys())


# ---------------------------------------------------------------------------------------------
# reading what peft wrote


@pytest.mark.slow
def test_read_matches_peft_layers(made: Made) -> None:
    adapter = loratool.read(made.path)
    layers = made.layers()
    assert set(adapter.modules) == set(layers)
    for name, layer in layers.items():
        m = adapter.modules[name]
        assert m.rank == layer.r["default"], name
        assert m.alpha == layer.lora_alpha["default"], name
        assert m.scale == layer.scaling["default"], name
        assert m.rslora == made.case.lora.get("use_rslora", False)
        assert m.kind == peft_kind(layer), name
        assert m.fan_in_fan_out == bool(getattr(layer, "fan_in_fan_out", False)), name
        if made.case.lora.get("use_dora"):
            assert m.magnitude is not None
            assert torch.equal(m.magnitude.load(), layer.lora_magnitude_vector["default"].weight.detach())
        else:
            assert m.magnitude is None
        assert m.dtype == str(made.case.dtype).removeprefix("torch.")
        assert_same_delta(delta(m), layer, made.case.dtype)


@pytest.mark.slow
def test_read_llama_patterns_and_sources(llama: Made) -> None:
    """rank_pattern / alpha_pattern keys of both kinds resolve as in peft; alpha_source says which."""
    adapter = loratool.read(llama.path)
    q1 = adapter.modules["model.layers.1.self_attn.q_proj"]
    q0 = adapter.modules["model.layers.0.self_attn.q_proj"]
    v0 = adapter.modules["model.layers.0.self_attn.v_proj"]
    assert (q1.rank, q1.alpha, q1.alpha_source) == (2, 3.0, "pattern")
    assert (v0.rank, v0.alpha, v0.alpha_source) == (6, 5.0, "pattern")
    assert (q0.rank, q0.alpha, q0.alpha_source) == (3, 8.0, "config")
    up = adapter.modules["model.layers.0.mlp.up_proj"]
    down = adapter.modules["model.layers.0.mlp.down_proj"]
    assert (up.rank, up.alpha, up.alpha_source) == (4, 2.0, "pattern")
    assert (down.rank, down.alpha, down.alpha_source) == (4, 8.0, "config")
    assert q1.scale == pytest.approx(3 / 2**0.5, rel=1e-15)  # rslora: alpha / sqrt(r)
    emb = adapter.modules["model.embed_tokens"]
    assert emb.kind == "embedding"
    assert emb.base_shape == (VOCAB, 32)


@pytest.mark.slow
def test_read_extras_are_peft_full_tensors(made: Made) -> None:
    """Every non-LoRA tensor peft saved is an extra, equal to the peft model's live tensor."""
    adapter = loratool.read(made.path)
    expected = {k.removeprefix(PREFIX) for k in saved_keys(made.path) if "lora_" not in k}
    assert set(adapter.extras) == expected
    for key, ref in adapter.extras.items():
        assert torch.equal(ref.load(), model_tensor(made.model, key).detach()), key
    if made.case.id.startswith("llama-rslora"):
        # save_embedding_layers: peft stores the targeted embedding's base weight as a full tensor
        assert expected == {"model.embed_tokens.base_layer.weight"}
    if made.case.id.startswith("distilbert"):
        # SEQ_CLS adds classifier/score to modules_to_save; "classifier" also suffix-matches pre_classifier
        assert expected == {"classifier.weight", "classifier.bias", "pre_classifier.weight", "pre_classifier.bias"}


# ---------------------------------------------------------------------------------------------
# writing for peft


@pytest.mark.slow
def test_written_adapter_loads_in_peft_with_same_logits(made: Made, tmp_path: Path) -> None:
    adapter = loratool.read(made.path)
    out = loratool.write(adapter, tmp_path / "out", fmt="peft")
    config = LoraConfig.from_pretrained(out)
    assert config.r == made.case.lora["r"]
    assert config.use_rslora == made.case.lora.get("use_rslora", False)
    assert config.use_dora == made.case.lora.get("use_dora", False)
    assert config.fan_in_fan_out == made.case.lora.get("fan_in_fan_out", False)

    model = load_peft(made, out)
    for name, layer in lora_layers(model).items():
        orig = made.layers()[name]
        assert layer.r["default"] == orig.r["default"], name
        assert layer.scaling["default"] == orig.scaling["default"], name
        assert torch.equal(layer.get_delta_weight("default"), orig.get_delta_weight("default")), name
    assert set(lora_layers(model)) == set(made.layers())
    got = _forward(model, made.inputs)
    assert got.dtype == made.logits.dtype
    assert torch.equal(got, made.logits), (got - made.logits).abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("case_id", ["llama-rslora-patterns-embedding", "gpt2-fan-in-fan-out",
                                     "distilbert-seqcls-modules-to-save", "llama-dora"])
def test_written_without_source_config_still_loads(case_id: str, tmp_path: Path) -> None:
    """An adapter whose peft config is gone (converted from kohya/diffusers, or built by an op):
    the config loratool writes must on its own make peft rebuild the same model."""
    made = _make(next(c for c in CASES if c.id == case_id), tmp_path / "src")
    adapter = loratool.read(made.path)
    bare = adapter.with_modules(dict(adapter.modules), config={})
    out = loratool.write(bare, tmp_path / "out", fmt="peft")
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA"
    model = load_peft(made, out)
    for name, layer in lora_layers(model).items():
        assert torch.equal(layer.get_delta_weight("default"), made.layers()[name].get_delta_weight("default")), name
    assert torch.equal(_forward(model, made.inputs), made.logits)


def _truncate(adapter: Adapter, name: str, rank: int, **changes: Any) -> Adapter:
    m = adapter.modules[name]
    down = m.down.load()[:rank].clone()  # (r', in)
    up = m.up.load()[:, :rank].clone()  # (out, r')
    modules = dict(adapter.modules)
    modules[name] = m.with_(down=TensorRef.from_tensor(down), up=TensorRef.from_tensor(up), **changes)
    return adapter.with_modules(modules)


@pytest.mark.slow
def test_modified_ranks_and_alphas_reproduced_by_peft(llama: Made, tmp_path: Path) -> None:
    """Per-module ranks/alphas that differ from the source config reach peft through the written
    rank_pattern / alpha_pattern, whatever the source patterns were."""
    adapter = loratool.read(llama.path)
    adapter = _truncate(adapter, "model.layers.0.self_attn.q_proj", 2, alpha=7.5)
    adapter = _truncate(adapter, "model.layers.1.mlp.down_proj", 3)  # rank only, alpha stays 8
    adapter = _truncate(adapter, "model.layers.0.self_attn.v_proj", 1, alpha=2.0)  # v_proj suffix pattern said 6/5
    modules = dict(adapter.modules)
    k1 = "model.layers.1.self_attn.k_proj"
    modules[k1] = modules[k1].with_(alpha=11.0)  # alpha only
    e = "model.embed_tokens"
    modules[e] = modules[e].with_(alpha=0.5)
    adapter = adapter.with_modules(modules)

    out = loratool.write(adapter, tmp_path / "out", fmt="peft")
    model = load_peft(llama, out)
    layers = lora_layers(model)
    assert set(layers) == set(adapter.modules)
    for name, m in adapter.modules.items():
        layer = layers[name]
        assert layer.r["default"] == m.rank, name
        assert layer.lora_alpha["default"] == m.alpha, name
        assert layer.scaling["default"] == m.scale, name
        assert_same_delta(delta(m), layer, torch.float32)
    assert layers["model.layers.0.self_attn.q_proj"].r["default"] == 2
    assert layers["model.layers.1.self_attn.v_proj"].r["default"] == 6  # untouched pattern module


@pytest.mark.slow
def test_mixed_rslora_modules_keep_their_scale_in_peft(llama: Made, tmp_path: Path) -> None:
    """use_rslora is one flag per peft adapter: a plain-scaled module among rslora ones gets its
    alpha converted so peft's scaling equals the module's own scale."""
    adapter = loratool.read(llama.path)
    modules = dict(adapter.modules)
    name = "model.layers.0.mlp.up_proj"
    modules[name] = modules[name].with_(rslora=False, alpha=3.0)  # scale 3/4
    adapter = adapter.with_modules(modules)
    out = loratool.write(adapter, tmp_path / "out", fmt="peft")
    model = load_peft(llama, out)
    layers = lora_layers(model)
    for n, m in adapter.modules.items():
        assert layers[n].scaling["default"] == pytest.approx(m.scale, rel=1e-12), n
        assert_same_delta(delta(m), layers[n], torch.float32, exact=n != name)


@pytest.mark.slow
def test_dropped_module_is_not_recreated_by_peft(llama: Made, tmp_path: Path) -> None:
    adapter = loratool.read(llama.path)
    modules = dict(adapter.modules)
    del modules["model.layers.1.mlp.gate_proj"]
    out = loratool.write(adapter.with_modules(modules), tmp_path / "out", fmt="peft")
    model = PeftModel.from_pretrained(llama.fresh_base(), out)
    assert set(lora_layers(model)) == set(modules)


@pytest.mark.slow
def test_gpt2_saved_with_fan_in_fan_out_false(tmp_path: Path) -> None:
    """Users often forget fan_in_fan_out=True on GPT-2: peft warns and fixes it per layer at runtime,
    so the deltas it applies are transposed even when a config says `fan_in_fan_out: false`."""
    case = Case("gpt2-fifo-false", _gpt2, dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "fan_in_fan_out is set to False but the target module is `Conv1D`"
        made = _make(case, tmp_path)
    # peft 0.21 saves the forced value; other tools and older peft leave the user's `false`
    cfg_path = made.path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["fan_in_fan_out"] = False
    cfg_path.write_text(json.dumps(cfg))
    adapter = loratool.read(made.path)
    for name, layer in made.layers().items():
        assert layer.fan_in_fan_out is True
        assert_same_delta(delta(adapter.modules[name]), layer, torch.float32)


# ---------------------------------------------------------------------------------------------
# the written config, as peft's own pattern matching reads it (no model needed)


def test_written_config_resolves_per_module_in_peft(tmp_path: Path) -> None:
    """Build an adapter with no source config and uneven ranks/alphas; the adapter_config.json we
    write must load as a LoraConfig whose patterns, resolved by peft's get_pattern_key, give every
    module its own rank and a scaling equal to the module's scale."""
    from peft.utils.other import get_pattern_key

    g = torch.Generator().manual_seed(3)
    spec = {  # name -> (rank, alpha)
        "model.layers.0.self_attn.q_proj": (4, 8.0), "model.layers.1.self_attn.q_proj": (4, 8.0),
        "model.layers.0.self_attn.v_proj": (2, 8.0), "model.layers.1.self_attn.v_proj": (4, 2.5),
        "model.layers.10.self_attn.q_proj": (6, 1.0), "layers.0.self_attn.q_proj": (3, 8.0),
    }
    modules = {
        n: loratool.LoraModule(n, TensorRef.from_tensor(torch.randn(r, 8, generator=g)),
                               TensorRef.from_tensor(torch.randn(8, r, generator=g)), alpha)
        for n, (r, alpha) in spec.items()
    }
    out = loratool.write(Adapter(modules=modules, source_format="kohya"), tmp_path / "out", fmt="peft")
    config = LoraConfig.from_pretrained(out)
    assert (config.r, config.lora_alpha, config.use_rslora) == (4, 8, False)
    for name, (rank, alpha) in spec.items():
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
        a = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha)
        assert (r, a) == (rank, alpha), name
        assert a / r == modules[name].scale
        assert any(name == t or name.endswith("." + t) for t in config.target_modules), name


class _ConvNet(torch.nn.Module):
    """A plain torch model with 3x3 and 1x1 convs and a linear head (peft LoRA works on any nn.Module)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 6, 1)
        self.head = torch.nn.Linear(6 * 5 * 5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv2(torch.relu(self.conv1(x))).flatten(1))


def test_conv_layers_read_and_written_like_peft(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = _ConvNet().eval()
    base_state = copy.deepcopy(base.state_dict())
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["conv1", "conv2", "head"], rank_pattern={"conv2": 2},
                        init_lora_weights=False)
    model = get_peft_model(base, config).eval()
    model.save_pretrained(tmp_path / "src")
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)

    adapter = loratool.read(tmp_path / "src")
    layers = lora_layers(model)
    assert {n: m.kind for n, m in adapter.modules.items()} == {"conv1": "conv", "conv2": "conv", "head": "linear"}
    for name, layer in layers.items():
        m = adapter.modules[name]
        assert (m.rank, m.scale) == (layer.r["default"], layer.scaling["default"])
        assert_same_delta(delta(m), layer, torch.float32)
        assert m.base_shape == tuple(layer.get_base_layer().weight.shape)

    out = loratool.write(adapter, tmp_path / "out", fmt="peft")
    fresh = _ConvNet()
    fresh.load_state_dict(base_state)
    result_model = PeftModel.from_pretrained(fresh, out).eval()
    result = result_model.load_adapter(out, adapter_name="check")
    assert (result.missing_keys, result.unexpected_keys) == ([], [])
    result_model.set_adapter("default")
    with torch.no_grad():
        assert torch.equal(result_model(x), expected)
