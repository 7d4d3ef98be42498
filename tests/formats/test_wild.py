"""Files from the wild (issue #11): layouts other tools write, read as those tools mean them.

References are independent of loratool: diffusers' own key-conversion tables and writers, peft's
get_pattern_key, and numbers computed in the test.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loratool.errors import FormatError
from loratool.formats import read
from loratool.formats.peft import PatternLookup
from loratool.ops.inspect import inspect_adapter
from loratool.ops.rescale import rescale
from loratool.ops.resize import resize

ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def _pair(out: int, inp: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, inp, generator=g), torch.randn(out, rank, generator=g)


# ---------------------------------------------------------------------------------------------
# item 5: the 2023 attention-processor layout


def legacy_state_dict(prefix: str) -> dict[str, torch.Tensor]:
    """What `unet.save_attn_procs` (LoRAAttnProcessor) and the text-encoder patching of 2023 wrote."""
    sd: dict[str, torch.Tensor] = {}
    for i, proj in enumerate(("to_q", "to_k", "to_v", "to_out")):
        down, up = _pair(32, 32, 4, i)
        sd[f"{prefix}{ATTN}.processor.{proj}_lora.down.weight"] = down
        sd[f"{prefix}{ATTN}.processor.{proj}_lora.up.weight"] = up
    te = "text_encoder.text_model.encoder.layers.0"
    for i, proj in enumerate(("to_q", "to_out")):
        down, up = _pair(16, 16, 2, 10 + i)
        sd[f"{te}.self_attn.{proj}_lora.down.weight"] = down
        sd[f"{te}.self_attn.{proj}_lora.up.weight"] = up
    down, up = _pair(16, 16, 2, 20)
    sd[f"{te}.mlp.fc1.lora_linear_layer.down.weight"] = down
    sd[f"{te}.mlp.fc1.lora_linear_layer.up.weight"] = up
    return sd


def diffusers_names(sd: dict[str, torch.Tensor]) -> set[str]:
    """Module names as diffusers itself converts these keys (its UNET_TO_DIFFUSERS / DIFFUSERS_OLD tables)."""
    pytest.importorskip("diffusers")
    from diffusers.utils.state_dict_utils import (
        StateDictType,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    unet = {k: v for k, v in sd.items() if not k.startswith("text_encoder.")}
    te = {k: v for k, v in sd.items() if k.startswith("text_encoder.")}
    names = set()
    for k in convert_unet_state_dict_to_peft(unet):
        names.add(re.sub(r"\.lora_[AB]\.weight$", "", k if k.startswith("unet.") else "unet." + k))
    for k in convert_state_dict_to_peft(te, StateDictType.DIFFUSERS_OLD):
        names.add(re.sub(r"\.lora_[AB](\.weight)?$", "", k))
    return names


@pytest.mark.parametrize("prefix", ["", "unet."])
@pytest.mark.parametrize("container", ["safetensors", "bin"])
def test_legacy_attention_processor_layout_is_read(tmp_path: Path, prefix: str, container: str) -> None:
    sd = legacy_state_dict(prefix)
    if container == "bin":
        path = tmp_path / "pytorch_lora_weights.bin"
        torch.save(sd, path)
    else:
        path = tmp_path / "pytorch_lora_weights.safetensors"
        save_file(sd, path)
    adapter = read(path, allow_pickle=True)
    assert adapter.source_format == "diffusers"
    assert set(adapter.modules) == diffusers_names(sd)
    assert f"unet.{ATTN}.to_out.0" in adapter.modules
    assert "text_encoder.text_model.encoder.layers.0.self_attn.out_proj" in adapter.modules
    m = adapter.modules[f"unet.{ATTN}.to_q"]
    assert torch.equal(m.down.load(), sd[f"{prefix}{ATTN}.processor.to_q_lora.down.weight"])
    assert m.rank == 4 and m.alpha_source == "implied"


def test_legacy_layout_matches_a_unet_base(tmp_path: Path) -> None:
    """Every processor module lands on a real weight of a diffusers UNet (fixtures/base_unet)."""
    from loratool.ops.validate import validate_adapter

    sd = {k: v for k, v in legacy_state_dict("").items() if not k.startswith("text_encoder.")}
    path = tmp_path / "legacy.safetensors"
    save_file(sd, path)
    report = validate_adapter(path, base=FIXTURES / "base_unet")
    assert report.matched and len(report.matched) == 4
    assert report.matched[f"unet.{ATTN}.to_out.0"] == f"{ATTN}.to_out.0.weight"


# ---------------------------------------------------------------------------------------------
# item 6: alpha in the safetensors header


def single_file(tmp_path: Path, *, prefix: str = "", metadata: dict[str, str] | None = None,
                name: str = "lora.safetensors", rank: int = 4) -> Path:
    sd = {}
    for i, proj in enumerate(("to_q", "to_k")):
        down, up = _pair(32, 32, rank, i)
        sd[f"{prefix}{ATTN}.{proj}.lora_A.weight"] = down
        sd[f"{prefix}{ATTN}.{proj}.lora_B.weight"] = up
    path = tmp_path / name
    save_file(sd, path, metadata={"format": "pt", **(metadata or {})})
    return path


LORA_CONFIG = {"r": 4, "lora_alpha": 16, "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False,
               "use_dora": False, "peft_type": "LORA", "target_modules": ["to_q", "to_k"]}


def test_alpha_from_lora_adapter_metadata(tmp_path: Path) -> None:
    path = single_file(tmp_path, metadata={"lora_adapter_metadata": json.dumps(LORA_CONFIG)})
    report = inspect_adapter(path)
    doc = report.to_dict()
    assert doc["alpha_sources"] == {"metadata": 2}
    assert {m["scale"] for m in doc["modules"]} == {4.0}  # 16 / 4, not 1
    assert not any("implied" in w for w in report.warnings)


def test_alpha_pattern_in_metadata_and_namespaced_header_keys(tmp_path: Path) -> None:
    cfg = {**LORA_CONFIG, "alpha_pattern": {"to_k": 2}}
    a = read(single_file(tmp_path, metadata={"lora_adapter_metadata": json.dumps(cfg)}))
    assert {n.rsplit(".", 1)[1]: m.scale for n, m in a.modules.items()} == {"to_q": 4.0, "to_k": 0.5}
    # SimpleTuner-style plain header keys (ComfyUI PR #15830): transformer.lora_alpha / transformer.r
    b = read(single_file(tmp_path, prefix="transformer.", name="st.safetensors",
                         metadata={"transformer.lora_alpha": "64", "transformer.r": "4"}))
    assert b.source_format == "diffusers"
    assert {m.scale for m in b.modules.values()} == {16.0}
    assert {m.alpha_source for m in b.modules.values()} == {"metadata"}
    c = read(single_file(tmp_path, name="plain.safetensors", metadata={"lora_alpha": "8"}))
    assert {m.scale for m in c.modules.values()} == {2.0}


def test_conflicting_or_malformed_header_alpha_is_refused(tmp_path: Path) -> None:
    bad = single_file(tmp_path, metadata={"lora_alpha": "8", "alpha": "16"})
    with pytest.raises(FormatError, match="disagrees about lora_alpha"):
        read(bad)
    notjson = single_file(tmp_path, name="nj.safetensors", metadata={"lora_adapter_metadata": "{r: 4"})
    with pytest.raises(FormatError, match="lora_adapter_metadata"):
        read(notjson)


@pytest.mark.slow
def test_diffusers_save_lora_adapter_file_round_trip(tmp_path: Path) -> None:
    """A file written by diffusers' save_lora_adapter is read with its alpha; loratool's rewrite
    (a single file, same dialect) loads back into diffusers and gives the same forward pass."""
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    def unet() -> UNet2DConditionModel:
        torch.manual_seed(0)
        return UNet2DConditionModel(
            block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=8, norm_num_groups=4, attention_head_dim=2)

    model = unet()
    model.add_adapter(LoraConfig(r=4, lora_alpha=16, target_modules=["to_q", "to_k", "to_out.0"],
                                 init_lora_weights=False))
    model.save_lora_adapter(tmp_path / "src")
    src = tmp_path / "src" / "pytorch_lora_weights.safetensors"
    a = read(src)
    assert {m.alpha for m in a.modules.values()} == {16.0}
    assert {m.alpha_source for m in a.modules.values()} == {"metadata"}

    out = tmp_path / "resized.safetensors"
    resize(src, out, rank=4)  # full rank: the same deltas, refactored (new factors, new alpha)
    assert out.is_file()
    with safe_open(out, "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert not any(k.startswith(("base_model.model.", "unet.")) for k in keys)  # same dialect as the input
    assert json.loads(meta["lora_adapter_metadata"])["r"] == 4

    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([3])
    ctx = torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(2))
    outputs = []
    for path in (None, src, out):
        m = unet()
        if path is not None:
            m.load_lora_adapter(str(path), prefix=None, adapter_name="x")
        with torch.no_grad():
            outputs.append(m(x, t, ctx).sample)
    plain, original, rewritten = outputs
    assert torch.linalg.norm(original - plain) > 1e-3  # the adapter does something
    torch.testing.assert_close(rewritten, original, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# item 7: a single-file input stays a single file


@pytest.mark.parametrize("prefix", ["", "diffusion_model."])
def test_resize_of_a_single_file_writes_a_single_file(tmp_path: Path, prefix: str) -> None:
    src = single_file(tmp_path, prefix=prefix, metadata={"lora_adapter_metadata": json.dumps(LORA_CONFIG)})
    out = tmp_path / "small.safetensors"
    resize(src, out, rank=2)
    assert out.is_file()
    with safe_open(out, "pt") as f:
        keys = sorted(f.keys())
        meta = f.metadata()
    assert keys == sorted(f"{prefix}{ATTN}.{p}.lora_{ab}.weight" for p in ("to_q", "to_k") for ab in "AB")
    back = read(out)
    assert {m.rank for m in back.modules.values()} == {2}
    assert [m.scale for m in back.modules.values()] == pytest.approx([4.0, 4.0])  # the scale is kept
    assert json.loads(meta["lora_adapter_metadata"])["r"] == 2
    # no name for the output: still one file, in the input's dialect
    out2 = tmp_path / "small2"
    resize(src, out2, rank=2)
    assert out2.is_file()
    # --format peft asks for a PEFT directory
    out3 = tmp_path / "peftdir"
    resize(src, out3, rank=2, fmt="peft")
    assert (out3 / "adapter_config.json").is_file()


def test_peft_directory_to_a_safetensors_path_is_a_file(tmp_path: Path, make_adapter) -> None:
    src = make_adapter(fmt="peft", rank=4, alpha=8)
    out = tmp_path / "r2.safetensors"
    resize(src, out, rank=2)
    assert out.is_file()
    back = read(out)
    want = read(src)
    assert {n: m.scale for n, m in back.modules.items()} == pytest.approx({n: m.scale for n, m in want.modules.items()})


# ---------------------------------------------------------------------------------------------
# item 14: pattern lookup follows peft's rule


def test_pattern_lookup_matches_peft_get_pattern_key() -> None:
    from peft.utils.other import get_pattern_key

    names = [f"model.layers.{i}.self_attn.{p}" for i in range(12) for p in ("q_proj", "k_proj", "o_proj")]
    names += ["layersX0.q_proj", "a.b", "model.layers.1.self_attn.q_projX"]
    keys = ["q_proj", re.escape("model.layers.1.self_attn.q_proj"), "^" + re.escape("model.layers.2.self_attn.k_proj"),
            "layers.0.q_proj", "layers.1.self_attn.k_proj", r"layers\.\d+\.self_attn\.o_proj",
            "self_attn.(q|k)_proj", "b", "^layers.0.q_proj", "model.layers.1.self_attn.o_pro.", "q_proj.*"]
    rng = random.Random(0)
    for _ in range(400):
        chosen = rng.sample(keys, rng.randint(0, len(keys)))
        lookup = PatternLookup(dict.fromkeys(chosen, 1))
        for n in names:
            ref = get_pattern_key(chosen, n)
            assert lookup.key(n) == (ref if ref in chosen else None), (chosen, n)


# ---------------------------------------------------------------------------------------------
# item 15: config values of the wrong type


@pytest.mark.parametrize("field", ["use_dora", "use_rslora", "fan_in_fan_out"])
def test_string_booleans_are_refused(make_adapter, field: str) -> None:
    path = make_adapter(fmt="peft", config={field: "false"})
    with pytest.raises(FormatError, match=f"'{field}' must be true or false"):
        read(path)


# ---------------------------------------------------------------------------------------------
# item 11: DoRA axis; item 20: messages


def test_dora_axis_from_the_stored_shape(tmp_path: Path) -> None:
    k = "lora_unet_down_blocks_0_attentions_0_proj_in"
    down, up = _pair(32, 32, 4, 0)
    for shape, axis in (((32, 1), "out"), ((1, 32), "in")):  # square: only the shape tells them apart
        path = tmp_path / f"dora_{axis}.safetensors"
        save_file({f"{k}.lora_down.weight": down, f"{k}.lora_up.weight": up, f"{k}.alpha": torch.tensor(4.0),
                   f"{k}.dora_scale": torch.rand(*shape)}, path)
        doc = inspect_adapter(path).to_dict()
        assert doc["modules"][0]["dora_axis"] == axis
        assert doc["dora_axes"] == {axis: 1}


def test_unreadable_input_is_not_an_error_while_writing(tmp_path: Path, make_adapter, monkeypatch) -> None:
    import errno

    from loratool.io import tensors

    src = make_adapter(fmt="kohya")
    real_open = open

    def failing_open(path, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        if "r" in mode and str(path) == str(src):
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(tensors, "open", failing_open, raising=False)
    with pytest.raises(Exception) as info:
        resize(src, tmp_path / "out.safetensors", rank=2)
    msg = str(info.value)
    assert str(src) in msg and "while writing" not in msg
    assert not (tmp_path / "out.safetensors").exists()


def test_kohya_alpha_overflow_names_the_output_not_a_temporary(tmp_path: Path, make_adapter) -> None:
    from loratool.errors import IncompatibleError

    src = make_adapter(fmt="kohya", alpha=8)
    out = tmp_path / "huge.safetensors"
    with pytest.raises(IncompatibleError) as info:
        rescale(src, out, mode="factor", value=1e38)
    msg = str(info.value)
    assert msg.startswith(f"{out}: ") and ".tmp" not in msg and "alpha is inf" not in msg
    assert "float32" in msg


def test_unreadable_config_is_not_called_invalid_json(make_adapter) -> None:
    d = make_adapter(fmt="peft")
    (d / "adapter_config.json").unlink()
    (d / "adapter_config.json").mkdir()
    with pytest.raises(FormatError) as info:
        read(d)
    assert "cannot be read" in str(info.value) and "JSON" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# item 9: LoRA on a layer that is also in modules_to_save


class _Cls(torch.nn.Module):
    """The base model of lora_on_modules_to_save: a query layer (LoRA) and a classifier head."""

    def __init__(self) -> None:
        super().__init__()
        self.query = torch.nn.Linear(32, 32)
        self.classifier = torch.nn.Linear(32, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.query(x))


def lora_on_modules_to_save(root: Path, *, twins_differ: bool = False, trained_weights: bool = True) -> Path:
    """The keys older peft wrote for a layer in both target_modules and modules_to_save: the trained
    copy's LoRA twice (`classifier.lora_A`, `classifier.modules_to_save.lora_A`), the frozen copy's
    LoRA (`classifier.original_module.lora_A`) and the trained copy's weights (`base_layer`)."""
    g = torch.Generator().manual_seed(0)
    sd = {"base_model.model.query.lora_A.weight": torch.randn(4, 32, generator=g),
          "base_model.model.query.lora_B.weight": torch.randn(32, 4, generator=g)}
    a, b = torch.randn(4, 32, generator=g), torch.randn(6, 4, generator=g)
    sd["base_model.model.classifier.modules_to_save.lora_A.weight"] = a
    sd["base_model.model.classifier.modules_to_save.lora_B.weight"] = b
    sd["base_model.model.classifier.lora_A.weight"] = a.clone()
    sd["base_model.model.classifier.lora_B.weight"] = b.clone() + (1.0 if twins_differ else 0.0)
    sd["base_model.model.classifier.original_module.lora_A.weight"] = torch.randn(4, 32, generator=g)
    sd["base_model.model.classifier.original_module.lora_B.weight"] = torch.randn(6, 4, generator=g)
    if trained_weights:
        sd["base_model.model.classifier.base_layer.weight"] = torch.randn(6, 32, generator=g)
        sd["base_model.model.classifier.base_layer.bias"] = torch.randn(6, generator=g)
    d = root / "cls"
    d.mkdir()
    save_file(sd, d / "adapter_model.safetensors")
    (d / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query", "classifier"],
        "modules_to_save": ["classifier"]}))
    return d


def _reference(d: Path) -> dict[str, torch.Tensor]:
    """What peft ran for the classifier: the trained copy plus its LoRA (alpha 8 / r 4), in numpy."""
    import numpy as np

    t = {k: v.double().numpy() for k, v in load_file(str(d / "adapter_model.safetensors")).items()}
    p = "base_model.model.classifier."
    b, a = t[p + "modules_to_save.lora_B.weight"], t[p + "modules_to_save.lora_A.weight"]
    w = t[p + "base_layer.weight"] + 2.0 * b @ a
    return {"classifier.weight": torch.from_numpy(np.asarray(w)),
            "classifier.bias": torch.from_numpy(t[p + "base_layer.bias"])}


def test_lora_on_a_modules_to_save_layer_is_the_trained_copy_plus_its_lora(tmp_path: Path) -> None:
    """Before, the layer was three modules (its delta applied three times) and resize rewrote
    target_modules / modules_to_save; then it was refused. Now it is what peft computes: one
    modules_to_save tensor = the trained copy's weight + its LoRA; the frozen copy's LoRA is unused."""
    d = lora_on_modules_to_save(tmp_path)
    a = read(d)
    assert list(a.modules) == ["query"]
    assert set(a.extras) == {"classifier.weight", "classifier.bias"}
    ref = _reference(d)
    for key, want in ref.items():
        got = a.extras[key].load()
        assert got.dtype == torch.float32 and tuple(got.shape) == a.extras[key].shape
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    doc = inspect_adapter(d).to_dict()
    assert [m["name"] for m in doc["modules"]] == ["query"]
    assert not doc["unsupported"]
    assert any("original_module" in w and "never runs" in w for w in doc["warnings"])


def test_lora_on_a_modules_to_save_layer_written_loads_in_peft_and_means_the_same(tmp_path: Path) -> None:
    from peft import PeftModel

    d = lora_on_modules_to_save(tmp_path)
    out = tmp_path / "out"
    resize(d, out, rank=2)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]
    torch.manual_seed(0)
    model = PeftModel.from_pretrained(_Cls(), str(out))
    head = model.base_model.model.classifier
    assert hasattr(head, "modules_to_save"), "peft did not wrap the classifier as modules_to_save"
    ref = _reference(d)
    torch.testing.assert_close(head.modules_to_save["default"].weight.detach().double(), ref["classifier.weight"],
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(head.modules_to_save["default"].bias.detach().double(), ref["classifier.bias"],
                               rtol=0, atol=1e-5)


def test_lora_on_a_modules_to_save_layer_merges_as_peft_runs_it(tmp_path: Path) -> None:
    from loratool.ops.merge import merge

    d = lora_on_modules_to_save(tmp_path)
    base = tmp_path / "base.safetensors"
    torch.manual_seed(1)
    weights = {k: v.detach().clone() for k, v in _Cls().state_dict().items()}
    save_file(weights, str(base))
    merge(base, [d], tmp_path / "merged.safetensors")
    merged = {k: v.double() for k, v in load_file(str(tmp_path / "merged.safetensors")).items()}
    ref = _reference(d)
    torch.testing.assert_close(merged["classifier.weight"], ref["classifier.weight"], rtol=0, atol=1e-5)
    torch.testing.assert_close(merged["classifier.bias"], ref["classifier.bias"], rtol=0, atol=1e-5)
    with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
        qa, qb = (f.get_tensor(f"base_model.model.query.lora_{x}.weight").double() for x in "AB")
    torch.testing.assert_close(merged["query.weight"], weights["query.weight"].double() + 2.0 * qb @ qa,
                               rtol=0, atol=1e-5)


def test_lora_on_a_modules_to_save_layer_that_cannot_be_modelled_is_refused(tmp_path: Path) -> None:
    from loratool.errors import IncompatibleError

    d = lora_on_modules_to_save(tmp_path, trained_weights=False)
    doc = inspect_adapter(d).to_dict()
    assert [m["name"] for m in doc["modules"]] == ["query"]
    assert any(".modules_to_save." in k for k in doc["unsupported"])
    with pytest.raises(IncompatibleError, match="modules_to_save layer"):
        resize(d, tmp_path / "out", rank=2)


def test_lora_on_a_modules_to_save_layer_with_differing_copies_is_an_error(tmp_path: Path) -> None:
    d = lora_on_modules_to_save(tmp_path, twins_differ=True)
    with pytest.raises(FormatError, match="two saved copies"):
        resize(d, tmp_path / "out", rank=2)
