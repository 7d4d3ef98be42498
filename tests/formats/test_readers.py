"""Readers on the committed fixtures: format, modules, ranks, alphas (and their source), scales,
kinds, DoRA, extras, and deltas against an independent numpy reference.

Every expected value here is written out by hand or computed from the raw tensors (read with
safetensors, not loratool) by the formula in DESIGN.md section 2 — never taken from loratool.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import load_file

import loratool
from loratool.cli import main
from loratool.maths.delta import delta

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
PEFT = "base_model.model."
UNET = "model.diffusion_model."
TE1 = "conditioner.embedders.0.transformer."


@dataclass(frozen=True)
class Mod:
    """What one module must read as, and where its raw tensors are."""

    name: str  # as loratool reports it
    down_key: str
    up_key: str
    base_key: str  # the base weight it adapts
    rank: int
    alpha: float
    alpha_source: str
    rslora: bool = False
    kind: str = "linear"
    fan_in_fan_out: bool = False
    magnitude_key: str | None = None

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.rslora else self.alpha / self.rank


@dataclass(frozen=True)
class Case:
    adapter: str  # path under fixtures/
    base: str
    format: str
    base_model: str | None
    weights: str  # the tensor file under fixtures/
    modules: list[Mod]
    dtype: str
    extras: dict[str, tuple[int, ...]] = field(default_factory=dict)
    warnings: tuple[tuple[str, str], ...] = ()  # (code, module) validate must report against the base


def peft_mod(name: str, rank: int, alpha: float, source: str, base_key: str | None = None, **kw) -> Mod:
    embedding = kw.get("kind") == "embedding"
    a, b = (".lora_embedding_A", ".lora_embedding_B") if embedding else (".lora_A.weight", ".lora_B.weight")
    return Mod(name, PEFT + name + a, PEFT + name + b, base_key or name + ".weight", rank, alpha, source, **kw)


def llama_case() -> Case:
    mods = []
    for layer in range(2):
        for suffix in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            name = f"model.layers.{layer}.{suffix}"
            # rank_pattern {"q_proj": 8, "layers.1.mlp.down_proj": 2}, r 4; alpha_pattern {"v_proj": 16}, lora_alpha 8
            rank = 8 if suffix.endswith("q_proj") else 2 if name == "model.layers.1.mlp.down_proj" else 4
            alpha, source = (16, "pattern") if suffix.endswith("v_proj") else (8, "config")
            mods.append(peft_mod(name, rank, alpha, source))
    return Case("peft_llama", "base_llama", "peft", "tiny-llama", "peft_llama/adapter_model.safetensors",
                mods, "float32")


def dora_case() -> Case:
    mods = []
    for layer in range(2):
        for suffix in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"):
            name = f"model.layers.{layer}.{suffix}"
            rank = 8 if suffix == "mlp.down_proj" else 4  # rank_pattern {"down_proj": 8}
            mods.append(peft_mod(name, rank, 8, "config", rslora=True,
                                 magnitude_key=PEFT + name + ".lora_magnitude_vector"))
    return Case("peft_dora", "base_llama", "peft", "tiny-llama", "peft_dora/adapter_model.safetensors",
                mods, "float32")


def gpt2_case() -> Case:
    mods = [peft_mod(f"transformer.h.{layer}.{suffix}", 4, 12, "config", fan_in_fan_out=True)
            for layer in range(2) for suffix in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    return Case("peft_gpt2", "base_gpt2", "peft", "tiny-gpt2", "peft_gpt2/adapter_model.safetensors",
                mods, "float32")


def cls_case() -> Case:
    mods = [peft_mod(f"distilbert.transformer.layer.{layer}.attention.{lin}", 4, 16, "config")
            for layer in range(2) for lin in ("q_lin", "v_lin")]
    mods.append(peft_mod("distilbert.embeddings.word_embeddings", 4, 16, "config", kind="embedding"))
    extras = {"classifier.weight": (3, 32), "classifier.bias": (3,),
              "pre_classifier.weight": (32, 32), "pre_classifier.bias": (32,)}
    return Case("peft_cls", "base_cls", "peft", "tiny-distilbert", "peft_cls/adapter_model.safetensors",
                mods, "float32", extras)


def kohya_case() -> Case:
    t = "input_blocks_4_1_transformer_blocks_0_"
    tb = UNET + "input_blocks.4.1.transformer_blocks.0."
    te = TE1 + "text_model.encoder.layers.0."
    table = [  # stored name, base key, rank, alpha (None: no .alpha tensor), kind
        ("lora_unet_input_blocks_1_0_in_layers_2", UNET + "input_blocks.1.0.in_layers.2.weight", 4, 1.0, "conv"),
        ("lora_unet_input_blocks_4_1_proj_in", UNET + "input_blocks.4.1.proj_in.weight", 8, 4.0, "conv"),
        (f"lora_unet_{t}attn1_to_q", tb + "attn1.to_q.weight", 8, 4.0, "linear"),
        (f"lora_unet_{t}attn1_to_k", tb + "attn1.to_k.weight", 8, 4.0, "linear"),
        (f"lora_unet_{t}attn1_to_v", tb + "attn1.to_v.weight", 8, 4.0, "linear"),
        (f"lora_unet_{t}attn1_to_out_0", tb + "attn1.to_out.0.weight", 8, 4.0, "linear"),
        (f"lora_unet_{t}attn2_to_k", tb + "attn2.to_k.weight", 8, 4.0, "linear"),
        ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", te + "self_attn.q_proj.weight", 8, 4.0, "linear"),
        ("lora_te1_text_model_encoder_layers_0_self_attn_v_proj", te + "self_attn.v_proj.weight", 8, 2.5, "linear"),
        ("lora_te1_text_model_encoder_layers_0_mlp_fc1", te + "mlp.fc1.weight", 8, None, "linear"),
    ]
    mods = [
        Mod(n, n + ".lora_down.weight", n + ".lora_up.weight", key, rank,
            alpha if alpha is not None else rank, "tensor" if alpha is not None else "implied", kind=kind)
        for n, key, rank, alpha, kind in table
    ]
    return Case("kohya_sd.safetensors", "base_sd.safetensors", "kohya", "sd_xl_base_1.0.safetensors",
                "kohya_sd.safetensors", mods, "float16",
                warnings=(("alpha-missing", "lora_te1_text_model_encoder_layers_0_mlp_fc1"),))


def diffusers_case() -> Case:
    a = "down_blocks.0.attentions.0."
    b = a + "transformer_blocks.0."
    mods = [Mod("unet." + a + "proj_in", f"unet.{a}proj_in.lora_A.weight", f"unet.{a}proj_in.lora_B.weight",
                a + "proj_in.weight", 4, 2, "metadata", kind="conv")]
    for local in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_k"):
        # lora_adapter_metadata: unet.r 4, unet.lora_alpha 2, alpha_pattern/rank_pattern {"attn2.to_k": 8}
        rank, alpha = (8, 8) if local == "attn2.to_k" else (4, 2)
        name = "unet." + b + local
        mods.append(Mod(name, name + ".lora_A.weight", name + ".lora_B.weight", b + local + ".weight",
                        rank, alpha, "metadata"))
    return Case("diffusers_sd.safetensors", "base_unet", "diffusers", None, "diffusers_sd.safetensors",
                mods, "bfloat16")


def diffusers_legacy_case() -> Case:
    b = "down_blocks.0.attentions.0.transformer_blocks.0."
    mods = [Mod(f"unet.{b}{p}", f"unet.{b}{p}.lora.down.weight", f"unet.{b}{p}.lora.up.weight", f"{b}{p}.weight",
                4, 4, "implied") for p in ("attn1.to_q", "attn1.to_v")]
    return Case("diffusers_legacy.safetensors", "base_unet", "diffusers", None, "diffusers_legacy.safetensors",
                mods, "float32", warnings=(("alpha-missing", None),))  # one warning for both modules


CASES = {c.adapter: c for c in (llama_case(), dora_case(), gpt2_case(), cls_case(), kohya_case(),
                                diffusers_case(), diffusers_legacy_case())}
ALL = pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))


def raw_tensors(rel: str) -> dict[str, np.ndarray]:
    """A safetensors file's tensors as float64 numpy (via torch, which also reads bf16)."""
    return {k: v.double().numpy() for k, v in load_file(FIXTURES / rel).items()}


def base_shapes(base: str) -> dict[str, tuple[int, ...]]:
    """Every base tensor's shape, from the safetensors headers (all shards)."""
    p = FIXTURES / base
    files = [p] if p.is_file() else sorted(p.glob("*.safetensors"))
    shapes = {}
    for f in files:
        with safe_open(f, "np") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shapes[k] = tuple(st.get_slice(k).get_shape())
    return shapes


def reference_delta(m: Mod, t: dict[str, np.ndarray]) -> np.ndarray:
    """ΔW = scale · up @ down, in the base weight's layout (DESIGN.md section 2), in float64."""
    down, up = t[m.down_key], t[m.up_key]
    rank = down.shape[0]
    d = m.scale * (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1))  # (out, r) @ (r, in·k)
    if m.kind == "embedding":
        return d.T  # B (dim, r) @ A (r, vocab) -> (dim, vocab); the embedding weight is (vocab, dim)
    if m.fan_in_fan_out:
        return d.T  # GPT-2 Conv1D stores (in, out)
    return d.reshape(up.shape[0], *down.shape[1:])  # conv: (out, in, kh, kw)


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the real entry point (exit-code mapping included) in-process."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


# ---------------------------------------------------------------------------------------------


@ALL
def test_detect(case: Case) -> None:
    assert loratool.detect(FIXTURES / case.adapter) == case.format


@ALL
def test_adapter_level_facts(case: Case) -> None:
    a = loratool.read(FIXTURES / case.adapter)
    assert a.source_format == case.format
    assert a.base_model == case.base_model
    assert a.unsupported == []
    assert {k: tuple(v.shape) for k, v in a.extras.items()} == case.extras
    assert len(a.modules) == len(case.modules)
    assert set(a.modules) == {m.name for m in case.modules}
    assert a.dora == any(m.magnitude_key for m in case.modules)
    assert a.rslora == any(m.rslora for m in case.modules)
    assert a.fan_in_fan_out == any(m.fan_in_fan_out for m in case.modules)


@ALL
def test_modules(case: Case) -> None:
    a = loratool.read(FIXTURES / case.adapter)
    t = raw_tensors(case.weights)
    for want in case.modules:
        got = a.modules[want.name]
        assert got.rank == want.rank, want.name
        assert got.alpha == pytest.approx(want.alpha), want.name
        assert got.alpha_source == want.alpha_source, want.name
        assert got.scale == pytest.approx(want.scale, rel=1e-12), want.name
        assert got.rslora == want.rslora, want.name
        assert got.kind == want.kind, want.name
        assert got.fan_in_fan_out == want.fan_in_fan_out, want.name
        assert got.dtype == case.dtype, want.name
        assert tuple(got.down.shape) == t[want.down_key].shape, want.name
        assert tuple(got.up.shape) == t[want.up_key].shape, want.name
        assert got.out_features == t[want.up_key].shape[0]
        assert got.in_features == t[want.down_key].shape[1]
        if want.magnitude_key:
            assert got.magnitude is not None, want.name
            mag = t[want.magnitude_key]
            assert mag.shape == (got.out_features,)
            np.testing.assert_array_equal(got.magnitude.load().double().numpy(), mag)
        else:
            assert got.magnitude is None, want.name


@ALL
def test_delta_matches_numpy_reference(case: Case) -> None:
    a = loratool.read(FIXTURES / case.adapter)
    t = raw_tensors(case.weights)
    shapes = base_shapes(case.base)
    for m in case.modules:
        ref = reference_delta(m, t)
        assert ref.shape == shapes[m.base_key], m.name  # the fixture fits its base
        got = delta(a.modules[m.name]).double().numpy()
        assert got.shape == ref.shape, m.name
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max(), err_msg=m.name)
        assert np.abs(ref).max() > 0  # a zero delta would make this test vacuous


@ALL
def test_extras_match_raw_tensors(case: Case) -> None:
    a = loratool.read(FIXTURES / case.adapter)
    t = raw_tensors(case.weights)
    for name in case.extras:
        np.testing.assert_array_equal(a.extras[name].load().double().numpy(), t[PEFT + name])


@pytest.mark.parametrize("name", ["peft_llama", "peft_dora", "peft_gpt2", "peft_cls"])
def test_peft_weights_file_given_directly(name: str) -> None:
    """The .safetensors inside a PEFT directory reads the same as the directory (config beside it)."""
    whole = loratool.read(FIXTURES / name)
    single = loratool.read(FIXTURES / name / "adapter_model.safetensors")
    assert loratool.detect(FIXTURES / name / "adapter_model.safetensors") == "peft"
    assert single.source_format == "peft"
    assert [(m.name, m.rank, m.alpha, m.alpha_source, m.scale) for m in single.modules.values()] == \
        [(m.name, m.rank, m.alpha, m.alpha_source, m.scale) for m in whole.modules.values()]


def test_kohya_metadata_is_the_header_metadata() -> None:
    with safe_open(FIXTURES / "kohya_sd.safetensors", "np") as st:
        header = st.metadata()
    a = loratool.read(FIXTURES / "kohya_sd.safetensors")
    assert a.metadata == header
    assert a.metadata["ss_network_dim"] == "8"
    assert json.loads(a.metadata["ss_tag_frequency"]) == {"10_tiny": {"cat": 3, "dog": 1}}
    assert a.metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_diffusers_metadata_is_kept() -> None:
    a = loratool.read(FIXTURES / "diffusers_sd.safetensors")
    cfg = json.loads(a.metadata["lora_adapter_metadata"])
    assert cfg["unet.r"] == 4 and cfg["unet.lora_alpha"] == 2


# ---------------------------------------------------------------------------------------------
# CLI on the fixtures


@ALL
def test_validate_against_its_base(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(["validate", str(FIXTURES / case.adapter), "--base", str(FIXTURES / case.base),
                        "--json"], capsys)
    assert code == 0
    doc = json.loads(out)
    assert doc["schema"] == 1 and doc["ok"] is True
    assert doc["num_modules"] == len(case.modules)
    assert doc["matched"] == len(case.modules)
    assert [f for f in doc["findings"] if f["severity"] == "error"] == []
    got = sorted((f["code"], f["module"]) for f in doc["findings"] if f["severity"] == "warning")
    assert got == sorted(case.warnings)


@ALL
def test_validate_human_output_exits_zero(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(["validate", str(FIXTURES / case.adapter), "--base", str(FIXTURES / case.base), "-q"],
                       capsys)
    assert code == 0, out
    assert out.strip()


def test_validate_against_the_wrong_base_fails(capsys: pytest.CaptureFixture[str]) -> None:
    """Guards the test above: a mismatched pair must not pass."""
    code, out, _ = cli(["validate", str(FIXTURES / "peft_gpt2"), "--base", str(FIXTURES / "base_llama"),
                        "--json"], capsys)
    assert code == 1
    assert json.loads(out)["ok"] is False


MODULE_KEYS = {"name", "kind", "out_features", "in_features", "rank", "alpha", "alpha_source", "scale", "dtype"}
TOP_KEYS = {"schema", "format", "path", "base_model", "num_modules", "lora_params", "fan_in_fan_out", "rslora",
            "dora", "metadata", "extras", "unsupported", "modules"}


@ALL
def test_inspect_json(case: Case, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(["inspect", str(FIXTURES / case.adapter), "--json"], capsys)
    assert code == 0
    doc = json.loads(out)
    assert set(doc) >= TOP_KEYS
    assert doc["schema"] == 1
    assert doc["format"] == case.format
    assert doc["path"] == str(FIXTURES / case.adapter)
    assert doc["base_model"] == case.base_model
    assert doc["num_modules"] == len(case.modules)
    t = raw_tensors(case.weights)
    assert doc["lora_params"] == sum(t[m.down_key].size + t[m.up_key].size for m in case.modules)
    assert doc["fan_in_fan_out"] == any(m.fan_in_fan_out for m in case.modules)
    assert doc["rslora"] == any(m.rslora for m in case.modules)
    assert doc["dora"] == any(m.magnitude_key for m in case.modules)
    with safe_open(FIXTURES / case.weights, "np") as st:
        assert doc["metadata"] == (st.metadata() or {})
    assert {e["name"]: tuple(e["shape"]) for e in doc["extras"]} == case.extras
    assert all(e["dtype"] == "float32" for e in doc["extras"])
    assert doc["unsupported"] == []
    rows = {r["name"]: r for r in doc["modules"]}
    assert set(rows) == {m.name for m in case.modules}
    for m in case.modules:
        row = rows[m.name]
        assert set(row) >= MODULE_KEYS
        assert (row["kind"], row["rank"], row["alpha_source"], row["dtype"]) == \
            (m.kind, m.rank, m.alpha_source, case.dtype), m.name
        assert row["alpha"] == pytest.approx(m.alpha) and row["scale"] == pytest.approx(m.scale), m.name
        assert (row["out_features"], row["in_features"]) == (t[m.up_key].shape[0], t[m.down_key].shape[1])
