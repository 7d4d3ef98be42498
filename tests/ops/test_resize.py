"""resize: exact truncated SVD (numpy dense reference), smallest-k rank rules, formats, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from clirun import run_cli
from safetensors.torch import load_file, safe_open, save_file

import loratool
from loratool.cli import cli
from loratool.maths.svd import choose_rank
from loratool.ops.resize import resize

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"

TORCH = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def kohya_file(path, modules, *, dtype=torch.float32, alphas=None, metadata=None):
    """modules: {name: (up ndarray (out, r[,1,1]), down ndarray (r, in[, kh, kw]))}; alpha float32 0-d."""
    sd = {}
    for name, (up, down) in modules.items():
        sd[f"{name}.lora_up.weight"] = torch.from_numpy(np.ascontiguousarray(up)).to(dtype)
        sd[f"{name}.lora_down.weight"] = torch.from_numpy(np.ascontiguousarray(down)).to(dtype)
        if alphas is None or name in alphas:
            a = (alphas or {}).get(name, float(down.shape[0]))
            sd[f"{name}.alpha"] = torch.tensor(a, dtype=torch.float32)
    save_file(sd, str(path), metadata=metadata or {"ss_network_dim": "8", "ss_network_alpha": "8"})
    return path


def peft_dir(path, modules, *, r, alpha, rslora=False, rank_pattern=None, alpha_pattern=None, dtype=torch.float32):
    path.mkdir()
    sd = {}
    for name, (up, down) in modules.items():
        sd[f"base_model.model.{name}.lora_A.weight"] = torch.from_numpy(down).to(dtype)
        sd[f"base_model.model.{name}.lora_B.weight"] = torch.from_numpy(up).to(dtype)
    save_file(sd, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "rank_pattern": rank_pattern or {},
        "alpha_pattern": alpha_pattern or {},
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in modules}),
        "task_type": None,
    }
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def rand_factors(rng, out, inp, r, kernel=()):
    up = rng.standard_normal((out, r, *([1] * len(kernel)))).astype(np.float32)
    down = rng.standard_normal((r, inp, *kernel)).astype(np.float32) / np.sqrt(inp)
    return up, down


def dense_np(up, down, scale):
    """Reference ΔW (out, in·k) in float64 from stored factors."""
    return scale * up.reshape(up.shape[0], -1).astype(np.float64) @ down.reshape(down.shape[0], -1).astype(np.float64)


def best_rank_k(m, k):
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k], s


def our_dense(module):
    up = module.up.load().double().reshape(module.up.shape[0], -1)
    down = module.down.load().double().reshape(module.down.shape[0], -1)
    return (up @ down).numpy() * module.scale


def stored(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy()


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_fixed_rank_is_best_rank_k_approximation(tmp_path, dtype, k):
    rng = np.random.default_rng(0)
    mods = {
        "lora_unet_a_to_q": rand_factors(rng, 48, 40, 8),
        "lora_unet_b_conv1": rand_factors(rng, 24, 12, 8, (3, 3)),
        "lora_te1_c_q_proj": rand_factors(rng, 16, 64, 6),
    }
    src = kohya_file(
        tmp_path / "in.safetensors",
        mods,
        dtype=TORCH[dtype],
        alphas={"lora_unet_a_to_q": 4.0, "lora_unet_b_conv1": 16.0},
    )
    # fp32 output so the comparison measures the SVD, not the storage rounding
    resize(src, tmp_path / "out.safetensors", rank=k, dtype="fp32")
    raw = load_file(str(src))
    out = loratool.read(tmp_path / "out.safetensors")
    for name in mods:
        up, down = stored(raw[f"{name}.lora_up.weight"]), stored(raw[f"{name}.lora_down.weight"])
        alpha = float(raw[f"{name}.alpha"]) if f"{name}.alpha" in raw else float(down.shape[0])
        ref, _ = best_rank_k(dense_np(up, down, alpha / down.shape[0]), min(k, down.shape[0]))
        got = our_dense(out.modules[name])
        assert out.modules[name].rank == min(k, down.shape[0])
        assert np.linalg.norm(got - ref) <= 1e-5 * np.linalg.norm(ref)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_keep_dtype_rounds_only_at_storage(tmp_path, dtype):
    rng = np.random.default_rng(1)
    mods = {"lora_unet_x_to_k": rand_factors(rng, 64, 32, 8)}
    src = kohya_file(tmp_path / "in.safetensors", mods, dtype=TORCH[dtype])
    resize(src, tmp_path / "out.safetensors", rank=4)
    out = loratool.read(tmp_path / "out.safetensors")
    m = out.modules["lora_unet_x_to_k"]
    assert m.up.dtype == m.down.dtype == str(TORCH[dtype]).removeprefix("torch.")
    raw = load_file(str(src))
    ref, _ = best_rank_k(
        dense_np(stored(raw["lora_unet_x_to_k.lora_up.weight"]), stored(raw["lora_unet_x_to_k.lora_down.weight"]), 1.0),
        4,
    )
    eps = 2e-2 if dtype == "bf16" else 3e-3
    assert np.linalg.norm(our_dense(m) - ref) <= eps * np.linalg.norm(ref)
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        assert f.get_tensor("lora_unet_x_to_k.alpha").dtype == torch.float32
        assert f.get_tensor("lora_unet_x_to_k.alpha").dim() == 0


def spectrum_module(sigmas, out=20, inp=16, seed=0):
    """Factors whose product has exactly the singular values `sigmas` (orthonormal U, V)."""
    rng = np.random.default_rng(seed)
    r = len(sigmas)
    u, _ = np.linalg.qr(rng.standard_normal((out, r)))
    v, _ = np.linalg.qr(rng.standard_normal((inp, r)))
    return (u * np.asarray(sigmas)).astype(np.float32), v.T.astype(np.float32).copy()


# σ = [4, 3, 2, 1]: cumulative Frobenius shares 0.730, 0.913, 0.983, 1; sum shares 0.4, 0.7, 0.9, 1;
# relative errors after k: 0.683, 0.408, 0.183, 0.  A kohya-style "+1" would give one more everywhere.
@pytest.mark.parametrize(
    ("method", "threshold", "expected"),
    [
        ("sv_fro", 0.9, 2),
        ("sv_fro", 0.73, 1),
        ("sv_fro", 0.99, 4),
        ("sv_fro", 0.98, 3),
        ("sv_cumulative", 0.7, 2),
        ("sv_cumulative", 0.71, 3),
        ("sv_cumulative", 0.4, 1),
        ("sv_ratio", 2.5, 3),
        ("sv_ratio", 4.0, 4),
        ("sv_ratio", 1.0, 1),
        ("sv_ratio", 2.0, 3),
        ("max_error", 0.2, 3),
        ("max_error", 0.5, 2),
        ("max_error", 0.0, 4),
        ("max_error", 0.7, 1),
    ],
)
def test_dynamic_rules_pick_the_smallest_rank(tmp_path, method, threshold, expected):
    sig = [4.0, 3.0, 2.0, 1.0]
    up, down = spectrum_module(sig)
    src = kohya_file(tmp_path / "in.safetensors", {"lora_unet_m_to_q": (up, down)})
    report = resize(src, tmp_path / "out.safetensors", method=method, threshold=threshold)
    assert report.modules[0].new_rank == expected
    kept = np.sqrt(np.sum(np.square(sig[:expected])) / np.sum(np.square(sig)))
    assert report.modules[0].fro_retained == pytest.approx(kept, rel=1e-6)
    assert report.modules[0].rel_error == pytest.approx(np.sqrt(1 - kept**2), abs=1e-6)
    out = loratool.read(tmp_path / "out.safetensors")
    assert out.metadata["ss_network_dim"] == "Dynamic"


def test_rank_caps_dynamic_rule_and_never_exceeds_input(tmp_path):
    up, down = spectrum_module([4.0, 3.0, 2.0, 1.0])
    src = kohya_file(tmp_path / "in.safetensors", {"lora_unet_m_to_q": (up, down)})
    assert resize(src, tmp_path / "a.safetensors", method="sv_fro", threshold=0.99, rank=2).modules[0].new_rank == 2
    assert resize(src, tmp_path / "b.safetensors", rank=64).modules[0].new_rank == 4
    assert choose_rank([0.0, 0.0, 0.0], "sv_fro", 0.9) == 1
    assert choose_rank([5.0, 0.0], "sv_ratio", 1e9) == 1


def test_all_zero_module_gets_rank_one(tmp_path):
    up = np.zeros((8, 4), np.float32)
    down = np.ones((4, 8), np.float32)
    src = kohya_file(tmp_path / "in.safetensors", {"lora_unet_z_to_q": (up, down)})
    report = resize(src, tmp_path / "o.safetensors", method="sv_fro", threshold=0.9)
    assert report.modules[0].new_rank == 1
    assert not loratool.read(tmp_path / "o.safetensors").modules["lora_unet_z_to_q"].up.load().any()


def test_peft_dynamic_resize_writes_rank_pattern_and_keeps_rslora_scale(tmp_path):
    rng = np.random.default_rng(3)
    mods = {
        f"model.layers.{i}.self_attn.{p}": rand_factors(rng, 32, 32, 8) for i in range(2) for p in ("q_proj", "v_proj")
    }
    mods["model.layers.0.self_attn.q_proj"] = spectrum_module([9.0, 1.0, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3], 32, 32)
    src = peft_dir(tmp_path / "in", mods, r=8, alpha=16, rslora=True, alpha_pattern={"v_proj": 4})
    report = resize(src, tmp_path / "out", method="sv_fro", threshold=0.95, dtype="fp32")
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True
    ranks = {m.name: m.new_rank for m in report.modules}
    assert ranks["model.layers.0.self_attn.q_proj"] == 1
    out = loratool.read(tmp_path / "out")
    for name, (up, down) in mods.items():
        scale = (4 if "v_proj" in name else 16) / np.sqrt(8)
        ref, _ = best_rank_k(dense_np(up, down, scale), ranks[name])
        m = out.modules[name]
        assert m.rank == ranks[name] and m.rslora
        assert np.linalg.norm(our_dense(m) - ref) <= 1e-5 * np.linalg.norm(ref)
    # every module whose rank differs from r is in rank_pattern
    for name, k in ranks.items():
        if k != cfg["r"]:
            assert any(name.endswith(key.replace("\\", "")) for key in cfg["rank_pattern"])


def test_conv_rank_and_modules_regex(tmp_path):
    rng = np.random.default_rng(4)
    mods = {
        "lora_unet_in_conv1": rand_factors(rng, 8, 4, 8, (3, 3)),
        "lora_unet_in_proj_in": rand_factors(rng, 8, 8, 8, (1, 1)),
        "lora_unet_attn_to_q": rand_factors(rng, 8, 8, 8),
    }
    src = kohya_file(tmp_path / "in.safetensors", mods)
    resize(src, tmp_path / "o.safetensors", rank=4, conv_rank=2)
    out = loratool.read(tmp_path / "o.safetensors")
    assert out.modules["lora_unet_in_conv1"].rank == 2
    assert out.modules["lora_unet_in_proj_in"].rank == 4  # 1x1 conv follows --rank, as in kohya
    assert out.modules["lora_unet_attn_to_q"].rank == 4
    # linear and 1x1 modules share rank 4; the 3x3 conv's rank 2 is kohya's conv_dim
    assert out.metadata["ss_network_dim"] == "4"
    assert json.loads(out.metadata["ss_network_args"])["conv_dim"] == "2"
    resize(src, tmp_path / "p.safetensors", rank=2, modules="to_q$")
    out = loratool.read(tmp_path / "p.safetensors")
    raw = load_file(str(src))
    assert out.modules["lora_unet_attn_to_q"].rank == 2
    assert torch.equal(out.modules["lora_unet_in_conv1"].down.load(), raw["lora_unet_in_conv1.lora_down.weight"])


def test_format_conversion_on_output(tmp_path):
    rng = np.random.default_rng(5)
    src = peft_dir(tmp_path / "in", {"model.layers.0.mlp.up_proj": rand_factors(rng, 16, 8, 4)}, r=4, alpha=8)
    resize(src, tmp_path / "o.safetensors", rank=2, fmt="kohya")
    out = loratool.read(tmp_path / "o.safetensors")
    assert out.source_format == "kohya"
    assert next(iter(out.modules.values())).scale == pytest.approx(2.0)


def test_dora_magnitude_kept_with_warning(tmp_path):
    rng = np.random.default_rng(6)
    up, down = rand_factors(rng, 16, 8, 4)
    d = tmp_path / "in"
    d.mkdir()
    mag = torch.rand(16) + 0.5
    save_file(
        {
            "base_model.model.l.q_proj.lora_A.weight": torch.from_numpy(down),
            "base_model.model.l.q_proj.lora_B.weight": torch.from_numpy(up),
            "base_model.model.l.q_proj.lora_magnitude_vector": mag,
        },
        str(d / "adapter_model.safetensors"),
    )
    (d / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4, "use_dora": True, "target_modules": ["q_proj"]})
    )
    report = resize(d, tmp_path / "o", rank=2)
    assert any("DoRA" in w for w in report.warnings)
    assert torch.equal(loratool.read(tmp_path / "o").modules["l.q_proj"].magnitude.load(), mag)


def test_huge_module_never_forms_dense_matrix(tmp_path):
    """65536 x 65536 at rank 8: the dense fp32 delta would be 16 GiB; peak RSS must stay small."""
    rng = np.random.default_rng(7)
    up = rng.standard_normal((65536, 8)).astype(np.float32)
    down = rng.standard_normal((8, 65536)).astype(np.float32)
    src = kohya_file(tmp_path / "big.safetensors", {"lora_unet_huge_proj": (up, down)})
    script = textwrap.dedent(f"""
        import resource
        from loratool.ops.resize import resize
        r = resize({str(src)!r}, {str(tmp_path / "o.safetensors")!r}, rank=4)
        print(r.modules[0].new_rank, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    rank, peak_kb = map(int, res.stdout.split())
    assert rank == 4
    assert peak_kb < 1_500_000, f"peak RSS {peak_kb / 1e6:.2f} GB"  # dense would need > 16 GB


# ---------------------------------------------------------------------------------------------- CLI


def run(args):
    return CliRunner().invoke(cli, args)


def test_cli_summary_and_json(tmp_path):
    rng = np.random.default_rng(8)
    src = kohya_file(tmp_path / "in.safetensors", {"lora_unet_a_to_q": rand_factors(rng, 16, 16, 8)})
    r = run(["resize", str(src), "-o", str(tmp_path / "o.safetensors"), "--rank", "4"])
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1].startswith(f"Wrote {tmp_path / 'o.safetensors'} (1 modules, rank 8 -> 4,")
    r = run(
        [
            "resize",
            str(src),
            "-o",
            str(tmp_path / "j.safetensors"),
            "--method",
            "sv_fro",
            "--threshold",
            "0.5",
            "--json",
        ]
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["schema"] == 1
    assert set(doc["modules"][0]) >= {"name", "old_rank", "new_rank", "fro_retained", "rel_error"}
    assert doc["modules"][0]["old_rank"] == 8


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ([], "--rank K or --method"),
        (["--threshold", "0.9"], "--threshold needs --method"),
        (["--method", "sv_fro"], "needs --threshold"),
        (["--method", "sv_ratio", "--threshold", "0.5"], "must be ≥ 1"),
        (["--method", "sv_fro", "--threshold", "1.5"], "share in (0, 1]"),
        (["--rank", "0"], "at least 1"),
        (["--rank", "2", "--modules", "("], "not a valid regular expression"),
        (["--rank", "2", "--modules", "nomatch"], "matches none"),
    ],
)
def test_cli_bad_options_exit_2(tmp_path, capsys, args, needle):
    rng = np.random.default_rng(9)
    src = kohya_file(tmp_path / "in.safetensors", {"lora_unet_a_to_q": rand_factors(rng, 8, 8, 4)})
    code, _, err = run_cli(["resize", str(src), "-o", str(tmp_path / "o"), *args])
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and needle in errors[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_existing_output_refused_without_force(tmp_path):
    rng = np.random.default_rng(10)
    src = kohya_file(tmp_path / "in.safetensors", {"lora_unet_a_to_q": rand_factors(rng, 8, 8, 4)})
    (tmp_path / "o.safetensors").write_bytes(b"keep me")
    r = run(["resize", str(src), "-o", str(tmp_path / "o.safetensors"), "--rank", "2"])
    assert r.exit_code != 0
    assert (tmp_path / "o.safetensors").read_bytes() == b"keep me"
    r = run(["resize", str(src), "-o", str(tmp_path / "o.safetensors"), "--rank", "2", "--force"])
    assert r.exit_code == 0
    assert loratool.read(tmp_path / "o.safetensors").modules["lora_unet_a_to_q"].rank == 2


@pytest.mark.slow
def test_resized_peft_adapter_loads_in_peft_with_truncated_deltas(tmp_path):
    """A real peft adapter (rslora, rank_pattern) resized dynamically: peft loads the output with no
    missing keys, and its get_delta_weight equals numpy's best rank-k approximation of the input."""
    import warnings

    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        init_lora_weights=False,
        rank_pattern={"gate_proj": 6},
        target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"), lora)
        with torch.no_grad():  # q_proj: one dominant direction, so the dynamic rule keeps rank 1 there
            for name, layer in pm.named_modules():
                if name.endswith("q_proj") and hasattr(layer, "lora_B"):
                    layer.lora_B["default"].weight[:, 1:] *= 0.01
        pm.save_pretrained(tmp_path / "in")
    report = resize(tmp_path / "in", tmp_path / "out", method="sv_fro", threshold=0.8, dtype="fp32")
    ranks = {m.name: m.new_rank for m in report.modules}
    assert len(set(ranks.values())) > 1  # a genuinely per-module result
    raw = load_file(str(tmp_path / "in" / "adapter_model.safetensors"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "out")
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    seen = 0
    for name, layer in model.base_model.model.named_modules():
        if not hasattr(layer, "lora_A") or "default" not in layer.lora_A:
            continue
        a = raw[f"base_model.model.{name}.lora_A.weight"].double().numpy()
        b = raw[f"base_model.model.{name}.lora_B.weight"].double().numpy()
        ref, _ = best_rank_k(dense_np(b, a, 16 / np.sqrt(a.shape[0])), ranks[name])
        got = layer.get_delta_weight("default").double().numpy()
        assert layer.r["default"] == ranks[name]
        assert np.linalg.norm(got - ref) <= 1e-5 * np.linalg.norm(ref), name
        seen += 1
    assert seen == len(ranks) == 8


def test_kohya_network_metadata_follows_the_resize(tmp_path):
    """ss_network_dim / ss_network_alpha describe the linear and 1x1 modules, ss_network_args'
    conv_dim / conv_alpha the 3x3 convs, all as the resized file holds them."""
    from loratool.formats.kohya import kohya_alpha
    from loratool.ops.resize import resize

    src = FIXTURES / "kohya_sd.safetensors"
    with safe_open(str(src), "pt") as f:
        assert json.loads(f.metadata()["ss_network_args"]) == {"conv_alpha": "1", "conv_dim": "4"}
    out = tmp_path / "r.safetensors"
    resize(src, out, rank=4, conv_rank=2)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    adapter = loratool.read(out)
    conv3 = [m for m in adapter.modules.values() if m.kind == "conv" and tuple(m.down.shape[2:]) == (3, 3)]
    lin = [m for m in adapter.modules.values() if m not in conv3]
    assert conv3 and {m.rank for m in conv3} == {2} and {m.rank for m in lin} == {4}
    assert meta["ss_network_dim"] == "4"
    alphas = {kohya_alpha(m) for m in lin}
    assert meta["ss_network_alpha"] == ("Dynamic" if len(alphas) > 1 else f"{alphas.pop():g}")
    args = json.loads(meta["ss_network_args"])
    assert args["conv_dim"] == "2" and float(args["conv_alpha"]) == kohya_alpha(conv3[0])


def test_rank_above_a_layers_smaller_dimension_keeps_it_exact(make_adapter, tmp_path):
    """Issue #11 item 8: a 6-class head and a one-output layer with r = 8, resized with --rank 16
    (or 7): no crash; they keep their exact delta at rank = their smaller dimension, and the report
    says so."""
    import numpy as np

    from loratool.formats import read

    mods = {"classifier": (6, 32), "score": (1, 32), "model.layers.0.self_attn.q_proj": (32, 32)}
    src = make_adapter(fmt="peft", modules=mods, rank=8, alpha=16)
    for k in (16, 7):
        out = tmp_path / f"r{k}"
        report = resize(src, out, rank=k)
        rows = {r.name: r for r in report.modules}
        assert rows["classifier"].new_rank == 6 and rows["classifier"].at_min_dimension
        assert rows["score"].new_rank == 1 and rows["score"].at_min_dimension
        assert not rows["model.layers.0.self_attn.q_proj"].at_min_dimension
        assert any("kept exact" in w for w in report.warnings)
        before, after = read(src), read(out)
        for name in ("classifier", "score"):
            a, b = before.modules[name], after.modules[name]
            want = a.scale * (a.up.load().double().numpy() @ a.down.load().double().numpy())
            got = b.scale * (b.up.load().double().numpy() @ b.down.load().double().numpy())
            assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)
