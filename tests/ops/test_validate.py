"""validate_adapter: one test per finding code, --strict, and the --base checks."""

from __future__ import annotations

import json

import pytest
import torch
from clirun import run_cli
from safetensors.torch import load_file, save_file

from loratool.errors import FormatError
from loratool.ops.validate import validate_adapter

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"
D = "model.layers.0.mlp.down_proj"
PEFT_BASE = {f"{Q}.weight": (32, 32), f"{V}.weight": (16, 32), f"{D}.weight": (32, 48)}  # conftest defaults
P = "base_model.model."
KQ = "lora_unet_down_blocks_0_attentions_0_proj_in"


def codes(report, severity=None):
    return sorted({f.code for f in report.findings if severity is None or f.severity == severity})


def finding(report, code):
    hits = [f for f in report.findings if f.code == code]
    assert hits, f"no {code} finding in {[f.to_dict() for f in report.findings]}"
    return hits[0]


# ---------------------------------------------------------------------------------------------
# clean adapters


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_clean_adapter_has_no_findings(make_adapter, fmt, dtype):
    report = validate_adapter(make_adapter(fmt=fmt, dtype=dtype))
    assert report.findings == []
    assert report.ok
    assert report.num_modules == (3 if fmt == "peft" else 4)
    assert report.to_dict()["ok"] is True


# ---------------------------------------------------------------------------------------------
# structure


def test_missing_up(make_adapter):
    path = make_adapter(fmt="kohya", drop=[f"{KQ}.lora_up.weight"])
    report = validate_adapter(path)
    f = finding(report, "missing-up")
    assert f.severity == "error" and f.module == KQ
    assert f"{KQ}.lora_down.weight" in f.message
    assert not report.ok
    assert report.num_modules == 4  # the broken module still counts; the other three are checked


def test_missing_down(make_adapter):
    report = validate_adapter(make_adapter(fmt="peft", drop=[f"{P}{V}.lora_A.weight"]))
    f = finding(report, "missing-down")
    assert f.module == V and f.severity == "error"
    assert codes(report) == ["missing-down"]


def test_rank_mismatch_shows_both_shapes(make_adapter):
    path = make_adapter(fmt="peft", rank=4, drop=[f"{P}{Q}.lora_B.weight"],
                        extra_tensors={f"{P}{Q}.lora_B.weight": torch.zeros(32, 6)})
    report = validate_adapter(path)
    f = finding(report, "rank-mismatch")
    assert f.module == Q
    assert "(4, 32)" in f.message and "(32, 6)" in f.message
    assert codes(report) == ["rank-mismatch"]


@pytest.mark.parametrize("down, up", [
    ((4,), (32, 4)),  # 1-D down
    ((4, 8, 3, 3), (16, 4, 3, 3)),  # conv up must be (out, r, 1, 1)
    ((4, 8, 3, 3), (16, 4)),  # conv down with a linear up
    ((0, 32), (32, 0)),  # rank 0
])
def test_bad_shape(make_adapter, down, up):
    path = make_adapter(fmt="kohya", modules={KQ: (32, 32)}, drop=[f"{KQ}.lora_down.weight", f"{KQ}.lora_up.weight"],
                        extra_tensors={f"{KQ}.lora_down.weight": torch.ones(down),
                                       f"{KQ}.lora_up.weight": torch.ones(up)})
    report = validate_adapter(path)
    assert codes(report) == ["bad-shape"]
    assert finding(report, "bad-shape").module == KQ


def test_bad_shape_dora_magnitude(make_adapter):
    path = make_adapter(fmt="peft", config={"use_dora": True},
                        extra_tensors={f"{P}{Q}.lora_magnitude_vector": torch.ones(32),
                                       f"{P}{V}.lora_magnitude_vector": torch.ones(17),  # v_proj has 16 rows
                                       f"{P}{D}.lora_magnitude_vector": torch.ones(32)})
    report = validate_adapter(path)
    assert codes(report) == ["bad-shape"]
    assert finding(report, "bad-shape").module == V


def test_duplicate_module_after_normalisation(make_adapter):
    twin = "model.layers.0.self_attn_q_proj"  # the same layer as Q once dots become underscores
    path = make_adapter(fmt="peft", modules={Q: (32, 32), twin: (32, 32)})
    report = validate_adapter(path)
    f = finding(report, "duplicate-module")
    assert Q in f.message and twin in f.message


def test_duplicate_module_two_naming_styles(tmp_path):
    # diffusers: the same layer as PEFT-style and as legacy .lora.down keys
    path = tmp_path / "dup.safetensors"
    stem = "unet.down_blocks.0.attentions.0.proj_in"
    save_file({f"{stem}.lora_A.weight": torch.ones(4, 8), f"{stem}.lora_B.weight": torch.ones(8, 4),
               f"{stem}.lora.down.weight": torch.ones(4, 8)}, str(path))
    report = validate_adapter(path)
    assert "duplicate-module" in codes(report, "error")


def test_unsupported_tensor_is_a_warning_next_to_plain_lora(make_adapter):
    oft = "lora_unet_mid_block_attentions_0_proj_out"
    path = make_adapter(fmt="kohya", extra_tensors={f"{oft}.oft_blocks": torch.ones(4, 2, 2)})
    report = validate_adapter(path)
    f = finding(report, "unsupported-tensor")
    assert f.severity == "warning" and "OFT" in f.message and "oft_blocks" in f.message
    assert report.ok  # the plain LoRA part is fine
    assert not validate_adapter(path, strict=True).ok


def test_only_unsupported_tensors_is_an_error(tmp_path):
    path = tmp_path / "oft.safetensors"
    save_file({"lora_unet_x.oft_blocks": torch.ones(4, 4, 4), "lora_unet_x.alpha": torch.tensor(1.0)}, str(path))
    report = validate_adapter(path)
    assert codes(report, "error") == ["no-lora-tensors"]
    assert "OFT" in finding(report, "no-lora-tensors").message
    assert not report.ok


# ---------------------------------------------------------------------------------------------
# config


def test_config_invalid(make_adapter):
    path = make_adapter(fmt="peft")
    (path / "adapter_config.json").write_text('{"r": 4,')
    report = validate_adapter(path)
    f = finding(report, "config-invalid")
    assert "adapter_config.json" in f.message
    assert codes(report) == ["config-invalid"]


@pytest.mark.parametrize("override, field", [({"r": 0}, "'r'"), ({"lora_alpha": "16"}, "lora_alpha"),
                                             ({"rank_pattern": ["q_proj"]}, "rank_pattern")])
def test_config_invalid_fields(make_adapter, override, field):
    report = validate_adapter(make_adapter(fmt="peft", config=override))
    assert codes(report) == ["config-invalid"]
    assert field in finding(report, "config-invalid").message


def test_config_rank_mismatch_global_r(make_adapter):
    report = validate_adapter(make_adapter(fmt="peft", rank=4, config={"r": 8}))
    assert codes(report) == ["config-rank-mismatch"]
    assert {f.module for f in report.findings} == {Q, V, D}
    assert "8" in report.findings[0].message and "4" in report.findings[0].message


@pytest.mark.parametrize("key", ["q_proj", r"layers\.0\.self_attn\.q_proj", r".*\.q_proj", Q])
def test_rank_pattern_is_matched_like_peft(make_adapter, key):
    """rank_pattern keys match a module-name suffix or a regex; the match decides the expected rank."""
    ok = make_adapter(fmt="peft", rank={Q: 8, V: 4, D: 4}, config={"r": 4, "rank_pattern": {key: 8}})
    assert validate_adapter(ok).findings == []
    bad = make_adapter(fmt="peft", rank=4, config={"r": 4, "rank_pattern": {key: 8}})
    report = validate_adapter(bad)
    assert codes(report) == ["config-rank-mismatch"]
    assert [f.module for f in report.findings] == [Q]
    assert "rank_pattern" in report.findings[0].message


def test_rank_pattern_suffix_does_not_match_partial_names(make_adapter):
    # "proj" is not a name suffix of "q_proj" in peft's sense (it must follow a dot)
    path = make_adapter(fmt="peft", rank=4, config={"r": 4, "rank_pattern": {"proj": 8}})
    assert validate_adapter(path).findings == []


def test_config_inconsistent_dora(make_adapter):
    no_magnitude = make_adapter(fmt="peft", config={"use_dora": True})
    report = validate_adapter(no_magnitude)
    assert codes(report) == ["config-inconsistent"]
    magnitude_without_flag = make_adapter(fmt="peft", extra_tensors={f"{P}{Q}.lora_magnitude_vector": torch.ones(32)})
    report = validate_adapter(magnitude_without_flag)
    assert codes(report) == ["config-inconsistent"]
    assert "use_dora" in report.findings[0].message


def test_alpha_missing_is_a_warning_and_strict_fails(make_adapter):
    path = make_adapter(fmt="kohya", alpha=None)
    report = validate_adapter(path)
    assert codes(report) == ["alpha-missing"]
    assert all(f.severity == "warning" for f in report.findings)
    # one finding with the count, not one per module (issue #11 item 12: 128 lines of the same warning)
    assert len(report.findings) == 1
    assert "4 modules have no .alpha tensor" in report.findings[0].message
    assert report.ok
    strict = validate_adapter(path, strict=True)
    assert not strict.ok
    assert strict.to_dict()["ok"] is False


# ---------------------------------------------------------------------------------------------
# values


@pytest.mark.parametrize("dtype, bad", [
    (torch.float32, "nan"), (torch.float32, "inf"), (torch.bfloat16, "nan"), (torch.bfloat16, "inf"),
    (torch.float16, "nan"), (torch.float16, "inf"), (torch.float8_e5m2, "inf"),
    (torch.float8_e4m3fn, "nan"),  # e4m3fn has no Inf
])
def test_non_finite(make_adapter, dtype, bad):
    path = make_adapter(fmt="peft", dtype=dtype, **{bad: True})
    report = validate_adapter(path)
    assert codes(report) == ["non-finite"]
    f = report.findings[0]
    assert f.module == Q and f.severity == "error"
    assert ("1 NaN" if bad == "nan" else "1 Inf") in f.message
    assert "adapter_model.safetensors" in f.message and f"{Q}.lora_A.weight" in f.message


def test_non_finite_alpha(make_adapter):
    report = validate_adapter(make_adapter(fmt="kohya", alpha=float("inf")))
    assert codes(report) == ["non-finite"]


def test_non_finite_extra_tensor(make_adapter):
    head = torch.ones(10, 32)
    head[3, 3] = float("nan")
    report = validate_adapter(make_adapter(fmt="peft", extra_tensors={f"{P}lm_head.weight": head}))
    assert codes(report) == ["non-finite"]
    assert report.findings[0].module == "lm_head.weight"


def test_zero_up_is_a_warning(make_adapter):
    report = validate_adapter(make_adapter(fmt="peft", zero_up=True))
    assert codes(report) == ["zero-up"]
    assert {f.module for f in report.findings} == {Q, V, D}
    assert report.ok and not validate_adapter(make_adapter(fmt="peft", zero_up=True), strict=True).ok


def test_mixed_dtypes(make_adapter):
    path = make_adapter(fmt="kohya", dtype=torch.float16, drop=[f"{KQ}.lora_up.weight"],
                        extra_tensors={f"{KQ}.lora_up.weight": torch.ones(32, 4, dtype=torch.float32)})
    report = validate_adapter(path)
    assert codes(report) == ["mixed-dtypes"]
    assert "float16" in report.findings[0].message and "float32" in report.findings[0].message


def test_peft_without_config_warns(make_adapter):
    report = validate_adapter(make_adapter(fmt="peft", config=False))
    assert codes(report) == ["config-missing"]
    assert report.ok


# ---------------------------------------------------------------------------------------------
# against a base checkpoint


@pytest.mark.parametrize("layout", ["file", "dir", "sharded"])
def test_base_layouts_match_every_module(make_adapter, make_base, layout):
    base = make_base({**PEFT_BASE, "model.norm.weight": (32,), "lm_head.weight": (50, 32)}, layout=layout, shards=3)
    report = validate_adapter(make_adapter(fmt="peft"), base=base)
    assert report.findings == []
    assert report.matched == {Q: f"{Q}.weight", V: f"{V}.weight", D: f"{D}.weight"}
    assert report.to_dict()["matched"] == 3


def test_sharded_base_is_read_through_the_index(make_adapter, make_base):
    base = make_base(PEFT_BASE, layout="sharded", shards=2)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    report = validate_adapter(make_adapter(fmt="peft"), base=base)
    assert report.ok and len(report.matched) == 3


def test_base_shape_mismatch(make_adapter, make_base):
    base = make_base({**PEFT_BASE, f"{V}.weight": (32, 32)})
    report = validate_adapter(make_adapter(fmt="peft"), base=base)
    assert codes(report) == ["base-shape-mismatch"]
    f = report.findings[0]
    assert f.module == V and "(16, 32)" in f.message and "(32, 32)" in f.message


def test_unmatched_module(make_adapter, make_base):
    base = make_base({k: s for k, s in PEFT_BASE.items() if not k.startswith(D)})
    report = validate_adapter(make_adapter(fmt="peft"), base=base)
    assert codes(report) == ["unmatched-module"]
    assert report.findings[0].module == D
    assert not report.ok


def test_no_module_matches(make_adapter, make_base):
    base = make_base({"something.else.weight": (4, 4)})
    report = validate_adapter(make_adapter(fmt="peft"), base=base)
    assert "no-match" in codes(report)
    assert codes(report, "error") == ["no-match", "unmatched-module"]


def test_ambiguous_module(make_adapter, make_base):
    # a bare "q_proj" matches the q_proj of both layers by suffix: it must not pick one
    keys = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    base = make_base({k: (32, 32) for k in keys})
    report = validate_adapter(make_adapter(fmt="peft", modules={"q_proj": (32, 32)}), base=base)
    f = finding(report, "ambiguous-module")
    assert f.module == "q_proj"
    assert keys[0] in f.message and keys[1] in f.message


def test_fan_in_fan_out_base_is_transposed(make_adapter, make_base):
    dense = "encoder.layers.0.dense"  # a layer stored (in, out), e.g. a Conv1D outside GPT-2
    in_out_base = make_base({f"{dense}.weight": (32, 96)})
    fifo = make_adapter(fmt="peft", modules={dense: (96, 32)}, fan_in_fan_out=True)
    assert validate_adapter(fifo, base=in_out_base).findings == []
    # the same factors without the flag do not fit an (in, out) weight, and vice versa
    plain = make_adapter(fmt="peft", modules={dense: (96, 32)}, fan_in_fan_out=False)
    # (the only module matched nothing usable, so the base as a whole is also reported)
    assert codes(validate_adapter(plain, base=in_out_base)) == ["base-shape-mismatch", "no-match"]
    out_in_base = make_base({f"{dense}.weight": (96, 32)})
    assert validate_adapter(plain, base=out_in_base).findings == []
    assert codes(validate_adapter(fifo, base=out_in_base)) == ["base-shape-mismatch", "no-match"]


def test_gpt2_conv1d_is_fan_in_fan_out_even_when_the_config_says_no(make_adapter, make_base):
    c_attn = "transformer.h.0.attn.c_attn"  # peft forces fan_in_fan_out for GPT-2 Conv1D layers
    gpt2_base = make_base({f"{c_attn}.weight": (32, 96)})
    plain = make_adapter(fmt="peft", modules={c_attn: (96, 32)}, fan_in_fan_out=False)
    report = validate_adapter(plain, base=gpt2_base)
    assert codes(report) == ["fan-in-fan-out-forced"]
    assert report.ok and report.matched == {c_attn: f"{c_attn}.weight"}


def test_embedding_shape_check(make_adapter, make_base):
    emb = "model.embed_tokens"
    path = make_adapter(fmt="peft", modules={}, embeddings={emb: (50, 16)})
    a = load_file(path / "adapter_model.safetensors")
    assert a[f"{P}{emb}.lora_embedding_A"].shape == (4, 50)  # (r, vocab), the factory's contract
    assert validate_adapter(path, base=make_base({f"{emb}.weight": (50, 16)})).findings == []
    report = validate_adapter(path, base=make_base({f"{emb}.weight": (16, 50)}))
    assert codes(report) == ["base-shape-mismatch", "no-match"]


def test_saved_modules_are_checked_against_the_base(make_adapter, make_base):
    path = make_adapter(fmt="peft", extra_tensors={f"{P}lm_head.weight": torch.ones(50, 32)})
    assert validate_adapter(path, base=make_base({**PEFT_BASE, "lm_head.weight": (50, 32)})).findings == []
    wrong = validate_adapter(path, base=make_base({**PEFT_BASE, "lm_head.weight": (60, 32)}))
    assert codes(wrong) == ["base-shape-mismatch"]
    missing = validate_adapter(path, base=make_base(PEFT_BASE))
    assert codes(missing) == ["unmatched-module"]
    assert missing.findings[0].module == "lm_head.weight"


SD_BASE = {
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (32, 32, 1, 1),  # SD1.x: a 1x1 conv
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (32, 32),
    "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (16, 8, 3, 3),
    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight": (24, 24),
    "model.diffusion_model.out.2.weight": (4, 32, 3, 3),
}
SD_LORA = {
    "lora_unet_input_blocks_1_1_proj_in": (32, 32),  # a linear LoRA on a 1x1 conv: compatible
    "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q": (32, 32),
    "lora_unet_input_blocks_1_0_in_layers_2": (16, 8, 3, 3),
    "lora_te_text_model_encoder_layers_0_self_attn_k_proj": (24, 24),
}


@pytest.mark.parametrize("layout", ["file", "sharded"])
def test_kohya_names_resolve_against_an_sd_base(make_adapter, make_base, layout):
    base = make_base(SD_BASE, layout=layout)
    report = validate_adapter(make_adapter(fmt="kohya", modules=SD_LORA), base=base)
    assert report.findings == []
    assert report.matched == {
        "lora_unet_input_blocks_1_1_proj_in": "model.diffusion_model.input_blocks.1.1.proj_in.weight",
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q":
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
        "lora_unet_input_blocks_1_0_in_layers_2": "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
        "lora_te_text_model_encoder_layers_0_self_attn_k_proj":
            "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight",
    }


def test_kohya_conv_kernel_must_match(make_adapter, make_base):
    base = make_base({**SD_BASE, "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (16, 8, 1, 1)})
    report = validate_adapter(make_adapter(fmt="kohya", modules=SD_LORA), base=base)
    assert codes(report) == ["base-shape-mismatch"]
    assert report.findings[0].module == "lora_unet_input_blocks_1_0_in_layers_2"


def test_kohya_unmatched_against_sd_base(make_adapter, make_base):
    lora = {**SD_LORA, "lora_unet_input_blocks_9_1_proj_out": (32, 32)}
    report = validate_adapter(make_adapter(fmt="kohya", modules=lora), base=make_base(SD_BASE))
    assert codes(report) == ["unmatched-module"]
    assert report.findings[0].module == "lora_unet_input_blocks_9_1_proj_out"


def test_unreadable_base_raises(make_adapter, tmp_path):
    (tmp_path / "base.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(FormatError, match=r"base\.safetensors"):
        validate_adapter(make_adapter(fmt="peft"), base=tmp_path / "base.safetensors")
    with pytest.raises(FormatError, match="no such file"):
        validate_adapter(make_adapter(fmt="peft"), base=tmp_path / "nope")


# ---------------------------------------------------------------------------------------------
# the CLI's exit codes and --json document


def test_cli_strict_and_json(make_adapter, capsys):
    path = str(make_adapter(fmt="kohya", alpha=None))
    assert run_cli(["validate", path])[0] == 0
    code, out, err = run_cli(["validate", path, "--strict", "--json"])
    assert code == 1 and err == ""
    doc = json.loads(out)
    assert doc["schema"] == 1 and doc["ok"] is False
    assert {f["code"] for f in doc["findings"]} == {"alpha-missing"}
    assert all(set(f) == {"severity", "code", "module", "message"} for f in doc["findings"])


def test_cli_findings_exit_1_with_base(make_adapter, make_base, capsys):
    path = str(make_adapter(fmt="peft"))
    base = str(make_base({k: s for k, s in PEFT_BASE.items() if not k.startswith(D)}, layout="dir"))
    code, out, err = run_cli(["validate", path, "--base", base])
    assert code == 1 and err == ""
    assert "unmatched-module" in out and D in out and "FAILED" in out
    assert run_cli(["validate", path, "--base", base, "--json"])[0] == 1
    assert run_cli(["validate", path, "--base", str(make_base(PEFT_BASE)), "--json"])[0] == 0
