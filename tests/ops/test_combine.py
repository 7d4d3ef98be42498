"""combine: exactness against numpy float64, parity with peft's merge_utils / add_weighted_adapter,
peft loading and forward pass, DoRA refusal, option checks, CLI.

Inputs are written with safetensors + json directly and outputs are read back the same way
(`read_out`), so every expected value comes from numpy or peft, never from loratool.

DARE draws: loratool seeds one torch.Generator with --seed and draws every mask on the CPU, module
by module in output order (the first input's file order, then modules only later inputs hold),
input by input, with torch.bernoulli(torch.full_like(delta, density)). The reference calls
torch.manual_seed(seed) once and then peft's merge_utils functions in that same order: the global
CPU generator and a fresh torch.Generator seeded alike produce the same stream.
"""

from __future__ import annotations

import copy
import json
import math
import re
import struct
import subprocess
import sys
import tempfile
import textwrap
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from clirun import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, safe_open, save_file

from loratool.cli import cli
from loratool.errors import IncompatibleError
from loratool.ops.combine import combine

PREFIX = "base_model.model."
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


# ---------------------------------------------------------------------------------------------
# inputs the test knows exactly


@dataclass
class Spec:
    """One input adapter: where it is and, per module, (up, down, scale) as stored (float32 numpy)."""

    path: Path
    modules: dict[str, tuple[np.ndarray, np.ndarray, float]]
    embeddings: frozenset[str] = frozenset()


def _factors(rng, shape, r):
    out_f, in_f, *kernel = shape
    down = (rng.standard_normal((r, in_f, *kernel)) / math.sqrt(in_f)).astype(np.float32)
    up = (rng.standard_normal((out_f, r, *([1] * len(kernel)))) / math.sqrt(r)).astype(np.float32)
    return up, down


def _pick(value, name):
    return value[name] if isinstance(value, dict) else value


def peft_adapter(path, shapes, *, rank=4, alpha=8.0, rslora=False, seed=0, embeddings=None, dtype=torch.float32):
    """A PEFT directory. shapes: linear (out, in) per module; embeddings: (num_embeddings, dim)."""
    rng = np.random.default_rng(seed)
    embeddings = embeddings or {}
    names = [*shapes, *embeddings]
    ranks = {n: _pick(rank, n) for n in names}
    alphas = {n: float(_pick(alpha, n)) for n in names}
    sd, mods = {}, {}
    for n in names:
        r = ranks[n]
        if n in embeddings:
            num, dim = embeddings[n]
            down = rng.standard_normal((r, num)).astype(np.float32)  # lora_embedding_A (r, num)
            up = (rng.standard_normal((dim, r)) / math.sqrt(r)).astype(np.float32)  # lora_embedding_B (dim, r)
            sd[f"{PREFIX}{n}.lora_embedding_A"] = torch.from_numpy(down).to(dtype)
            sd[f"{PREFIX}{n}.lora_embedding_B"] = torch.from_numpy(up).to(dtype)
        else:
            up, down = _factors(rng, shapes[n], r)
            sd[f"{PREFIX}{n}.lora_A.weight"] = torch.from_numpy(down).to(dtype)
            sd[f"{PREFIX}{n}.lora_B.weight"] = torch.from_numpy(up).to(dtype)
        scale = alphas[n] / (math.sqrt(r) if rslora else r)
        mods[n] = (sd[f"{PREFIX}{n}.lora_{'embedding_B' if n in embeddings else 'B.weight'}"].float().numpy(),
                   sd[f"{PREFIX}{n}.lora_{'embedding_A' if n in embeddings else 'A.weight'}"].float().numpy(), scale)
    path.mkdir()
    save_file(sd, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    a0 = Counter(alphas.values()).most_common(1)[0][0]
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r0, "lora_alpha": a0, "use_rslora": rslora,
        "rank_pattern": {re.escape(n): r for n, r in ranks.items() if r != r0},
        "alpha_pattern": {re.escape(n): a for n, a in alphas.items() if a != a0},
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in names}),
        "lora_dropout": 0.0, "bias": "none", "use_dora": False, "fan_in_fan_out": False,
    }
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return Spec(path, mods, frozenset(embeddings))


def kohya_adapter(path, shapes, *, rank=4, alpha=None, seed=0, dtype=torch.float32):
    """A kohya file. shapes: (out, in) or conv (out, in, kh, kw); alpha None: no .alpha tensor (= rank)."""
    rng = np.random.default_rng(seed)
    sd, mods = {}, {}
    for n, shape in shapes.items():
        r = _pick(rank, n)
        a = _pick(alpha, n)
        up, down = _factors(rng, shape, r)
        sd[f"{n}.lora_down.weight"] = torch.from_numpy(down).to(dtype)
        sd[f"{n}.lora_up.weight"] = torch.from_numpy(up).to(dtype)
        if a is not None:
            sd[f"{n}.alpha"] = torch.tensor(float(a), dtype=torch.float32)
        mods[n] = (sd[f"{n}.lora_up.weight"].float().numpy(), sd[f"{n}.lora_down.weight"].float().numpy(),
                   (float(a) if a is not None else r) / r)
    save_file(sd, str(path), metadata={"ss_network_dim": "4"})
    return Spec(path, mods)


def _pattern(patterns, name):
    """peft's get_pattern_key rule: a key matches any dotted suffix of the module path."""
    return next((k for k in patterns if re.match(rf"(.*\.)?({k})$", name)), None)


def read_out(path):
    """{name: (up 2-D, down 2-D, scale)} of a written adapter, read with safetensors + json only."""
    path = Path(path)
    res = {}
    if path.is_dir():
        cfg = json.loads((path / "adapter_config.json").read_text())
        sd = load_file(str(path / "adapter_model.safetensors"))
        for key, a in sd.items():
            m = re.fullmatch(re.escape(PREFIX) + r"(.+)\.lora_(A\.weight|embedding_A)", key)
            if not m:
                continue
            name = m.group(1)
            b = sd[key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")]
            r = a.shape[0]
            rp = _pattern(cfg.get("rank_pattern") or {}, name)
            assert r == (cfg["rank_pattern"][rp] if rp else cfg["r"]), f"{name}: config rank disagrees"
            ap = _pattern(cfg.get("alpha_pattern") or {}, name)
            alpha = cfg["alpha_pattern"][ap] if ap else cfg["lora_alpha"]
            scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
            res[name] = (b.double().numpy().reshape(b.shape[0], -1), a.double().numpy().reshape(r, -1), scale)
    else:
        sd = load_file(str(path))
        for key, d in sd.items():
            if key.endswith(".lora_down.weight"):
                name = key[: -len(".lora_down.weight")]
                u = sd[name + ".lora_up.weight"]
                r = d.shape[0]
                alpha = float(sd[name + ".alpha"]) if name + ".alpha" in sd else r
                res[name] = (u.double().numpy().reshape(u.shape[0], -1), d.double().numpy().reshape(r, -1), alpha / r)
    return res


def dense(up, down, scale):
    """ΔW in the (out, in·k) layout of up @ down, float64."""
    return scale * (up.reshape(up.shape[0], -1).astype(np.float64) @ down.reshape(down.shape[0], -1).astype(np.float64))


def weighted_sum(specs, weights, name):
    return sum(w * dense(*s.modules[name]) for s, w in zip(specs, weights) if name in s.modules)


def rel(got, ref):
    return np.linalg.norm(got - ref) / np.linalg.norm(ref)


def best_rank_k(m, k):
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k], s


def llama(names=("q_proj", "v_proj"), layers=(0, 1)):
    shapes = {"q_proj": (32, 32), "k_proj": (16, 32), "v_proj": (16, 32), "o_proj": (32, 32),
              "gate_proj": (48, 32), "up_proj": (48, 32), "down_proj": (32, 48)}
    part = {n: "mlp" if n in ("gate_proj", "up_proj", "down_proj") else "self_attn" for n in shapes}
    return {f"model.layers.{i}.{part[n]}.{n}": shapes[n] for i in layers for n in names}


def three_peft_inputs(tmp_path):
    """Mixed rsLoRA/plain, different ranks (rank_pattern), alphas (alpha_pattern), targets, an embedding."""
    emb = {"model.embed_tokens": (64, 32)}
    a_shapes = llama(("q_proj", "v_proj", "down_proj"))
    a = peft_adapter(tmp_path / "a", a_shapes, rank={n: 8 if "q_proj" in n else 4 for n in [*a_shapes, *emb]},
                     alpha=16, rslora=True, seed=1, embeddings=emb)
    b_shapes = llama(("q_proj", "k_proj", "gate_proj"))
    b = peft_adapter(tmp_path / "b", b_shapes, rank=2,
                     alpha={n: 3.0 if "k_proj" in n else 4.0 for n in [*b_shapes, *emb]}, seed=2, embeddings=emb)
    c = peft_adapter(tmp_path / "c", llama(("v_proj", "down_proj"), layers=(1,)), rank=6, alpha=6, seed=3)
    return [a, b, c]


KOHYA_SHAPES = {
    "lora_unet_in_blocks_0_attn1_to_q": (24, 16),
    "lora_unet_in_blocks_1_conv1": (8, 4, 3, 3),
    "lora_unet_in_blocks_1_proj_in": (8, 8, 1, 1),
}


def two_kohya_inputs(tmp_path):
    a = kohya_adapter(tmp_path / "a.safetensors", KOHYA_SHAPES, rank=4, alpha={"lora_unet_in_blocks_0_attn1_to_q": 2.0,
                      "lora_unet_in_blocks_1_conv1": 1.0, "lora_unet_in_blocks_1_proj_in": None}, seed=4)
    b_shapes = {**KOHYA_SHAPES, "lora_te1_text_model_encoder_layers_0_self_attn_k_proj": (12, 12)}
    b = kohya_adapter(tmp_path / "b.safetensors", b_shapes, rank={n: 2 if "conv1" in n else 3 for n in b_shapes},
                      alpha=5.0, seed=5)
    return [a, b]


# ---------------------------------------------------------------------------------------------
# cat: the exact weighted sum


def test_cat_is_exact_weighted_sum_of_mixed_peft_inputs(tmp_path):
    specs = three_peft_inputs(tmp_path)
    weights = [0.7, -1.3, 0.25]
    report = combine([s.path for s in specs], tmp_path / "out", weights=weights, method="cat")
    out = read_out(tmp_path / "out")
    union = set().union(*(s.modules for s in specs))
    assert set(out) == union
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False
    rows = {m.name: m for m in report.modules}
    for name in union:
        ref = weighted_sum(specs, weights, name)
        up, down, scale = out[name]
        assert scale == pytest.approx(1.0)
        assert up.shape[1] == sum(s.modules[name][1].shape[0] for s in specs if name in s.modules)
        assert rel(dense(up, down, scale), ref) <= 1e-6, name
        assert rows[name].input_ranks == [s.modules[name][1].shape[0] if name in s.modules else None for s in specs]
        assert rows[name].fro_retained == 1.0 and rows[name].rel_error < 1e-6
    assert report.to_dict()["schema"] == 1


def test_cat_kohya_with_conv_layers_and_missing_alpha(tmp_path):
    specs = two_kohya_inputs(tmp_path)
    weights = [1.0, -0.5]
    combine([s.path for s in specs], tmp_path / "o.safetensors", weights=weights, method="cat")
    out = read_out(tmp_path / "o.safetensors")
    assert set(out) == set(specs[1].modules)
    raw = load_file(str(tmp_path / "o.safetensors"))
    for name in out:
        assert rel(dense(*out[name]), weighted_sum(specs, weights, name)) <= 1e-6, name
        assert raw[name + ".alpha"].dtype == torch.float32 and raw[name + ".alpha"].dim() == 0
    conv = raw["lora_unet_in_blocks_1_conv1.lora_down.weight"]
    assert tuple(conv.shape) == (4 + 2, 4, 3, 3)
    assert tuple(raw["lora_unet_in_blocks_1_conv1.lora_up.weight"].shape) == (8, 6, 1, 1)


def test_cat_matches_kohya_names_to_diffusers_paths(tmp_path):
    rng = np.random.default_rng(6)
    diff_mods = {
        "unet.down_blocks.0.attentions.0.proj_in": (8, 8, 1, 1),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0": (16, 16),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (16, 16),
    }
    sd, diff = {}, {}
    for n, shape in diff_mods.items():
        up, down = _factors(rng, shape, 4)
        sd[f"{n}.lora_A.weight"], sd[f"{n}.lora_B.weight"] = torch.from_numpy(down), torch.from_numpy(up)
        sd[f"{n}.alpha"] = torch.tensor(2.0)
        diff[n] = (up, down, 0.5)
    save_file(sd, str(tmp_path / "diffusers.safetensors"))
    dspec = Spec(tmp_path / "diffusers.safetensors", diff)
    kspec = kohya_adapter(tmp_path / "k.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_proj_in": (8, 8, 1, 1),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0": (16, 16),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (12, 12),
    }, rank=3, alpha=6.0, seed=7)
    # the kohya names as the test expects the dotted paths to translate
    as_kohya = {n: "lora_unet_" + n.removeprefix("unet.").replace(".", "_") for n in diff}
    weights = [0.5, 2.0]
    report = combine([kspec.path, dspec.path], tmp_path / "o.safetensors", weights=weights, method="cat")
    assert any("only some of the inputs" in w for w in report.warnings)
    out = read_out(tmp_path / "o.safetensors")
    assert set(out) == set(kspec.modules) | set(as_kohya.values())
    for dotted, kname in as_kohya.items():
        ref = weights[1] * dense(*diff[dotted])
        if kname in kspec.modules:
            ref = ref + weights[0] * dense(*kspec.modules[kname])
        assert rel(dense(*out[kname]), ref) <= 1e-6, kname
    # PEFT output needs a module path for every module; the text-encoder one has none
    with pytest.raises(IncompatibleError, match="lora_te1_text_model_encoder_layers_0_self_attn_q_proj"):
        combine([dspec.path, kspec.path], tmp_path / "p", weights=weights, method="cat")
    assert not (tmp_path / "p").exists()


def test_inputs_of_different_formats_sharing_no_module_are_refused(tmp_path):
    with pytest.raises(IncompatibleError, match="share no module"):
        combine([FIXTURES / "kohya_sd.safetensors", FIXTURES / "diffusers_sd.safetensors"], tmp_path / "o",
                weights=[1, 1], method="cat")
    assert not (tmp_path / "o").exists()


def test_same_layer_of_different_shape_is_refused(tmp_path):
    a = kohya_adapter(tmp_path / "a.safetensors", {"lora_unet_x_to_q": (16, 8)})
    b = kohya_adapter(tmp_path / "b.safetensors", {"lora_unet_x_to_q": (8, 16)})
    with pytest.raises(IncompatibleError, match=r"lora_unet_x_to_q.*\(16, 8\).*\(8, 16\)"):
        combine([a.path, b.path], tmp_path / "o.safetensors", weights=[1, 1], method="cat")


# ---------------------------------------------------------------------------------------------
# svd: the best rank-k approximation of the exact sum


@pytest.mark.parametrize("rank", [None, 3])
def test_svd_is_best_rank_k_approximation_of_the_sum(tmp_path, rank):
    specs = three_peft_inputs(tmp_path)
    weights = [0.7, -1.3, 0.25]
    report = combine([s.path for s in specs], tmp_path / "out", weights=weights, method="svd", rank=rank)
    out = read_out(tmp_path / "out")
    rows = {m.name: m for m in report.modules}
    for name, (up, down, scale) in out.items():
        exact = weighted_sum(specs, weights, name)
        default = max(s.modules[name][1].shape[0] for s in specs if name in s.modules)
        k = min(rank or default, sum(s.modules[name][1].shape[0] for s in specs if name in s.modules))
        ref, sig = best_rank_k(exact, k)
        assert up.shape[1] == k and scale == pytest.approx(1.0)
        assert rel(dense(up, down, scale), ref) <= 1e-5, name
        kept = math.sqrt(np.sum(sig[:k] ** 2) / np.sum(sig**2))
        assert rows[name].fro_retained == pytest.approx(kept, rel=1e-6)
        assert rows[name].rel_error == pytest.approx(math.sqrt(max(0.0, 1 - kept**2)), abs=1e-5)


def test_svd_of_kohya_conv_inputs(tmp_path):
    specs = two_kohya_inputs(tmp_path)
    weights = [0.3, 0.9]
    combine([s.path for s in specs], tmp_path / "o.safetensors", weights=weights, method="svd", rank=2)
    out = read_out(tmp_path / "o.safetensors")
    for name, m in out.items():
        ref, _ = best_rank_k(weighted_sum(specs, weights, name), 2)
        assert rel(dense(*m), ref) <= 1e-5, name


def test_svd_never_forms_a_dense_matrix(tmp_path):
    """Two 65536 x 65536 rank-8 inputs: a dense fp32 delta would be 16 GiB; peak RSS must stay small."""
    rng = np.random.default_rng(8)
    paths = []
    for i in range(2):
        sd = {"lora_unet_huge_proj.lora_up.weight": torch.from_numpy(rng.standard_normal((65536, 8), np.float32)),
              "lora_unet_huge_proj.lora_down.weight": torch.from_numpy(rng.standard_normal((8, 65536), np.float32))}
        save_file(sd, str(tmp_path / f"{i}.safetensors"))
        paths.append(str(tmp_path / f"{i}.safetensors"))
    script = textwrap.dedent(f"""
        import resource
        from loratool.ops.combine import combine
        r = combine({paths!r}, {str(tmp_path / "o.safetensors")!r}, weights=[0.5, 0.5], method="svd")
        print(r.modules[0].rank, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    rank, peak_kb = map(int, res.stdout.split())
    assert rank == 8
    assert peak_kb < 1_500_000, f"peak RSS {peak_kb / 1e6:.2f} GB"


# ---------------------------------------------------------------------------------------------
# ties, dare_linear, dare_ties, magnitude_prune: peft's merge_utils on dense deltas, then truncated


def _header_order(spec):
    """Module names in the order of the safetensors header (the order loratool visits them)."""
    f = spec.path / "adapter_model.safetensors" if spec.path.is_dir() else spec.path
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    names = []
    for key in json.loads(raw[8 : 8 + n]):
        m = re.fullmatch(re.escape(PREFIX) + r"(.+)\.lora_(A\.weight|embedding_A)", key)
        if m:
            names.append(m.group(1))
    return names


def _peft_layout_delta(spec, name):
    """The task tensor peft's get_delta_weight gives: (B @ A) · scale in float32, embeddings transposed."""
    up, down, scale = spec.modules[name]
    d = (torch.from_numpy(up) @ torch.from_numpy(down)) * scale
    return d.T if name in spec.embeddings else d


DENSE_CASES = [("ties", "total"), ("ties", "frequency"), ("dare_linear", "total"), ("dare_ties", "total"),
               ("dare_ties", "frequency"), ("magnitude_prune", "total")]


@pytest.mark.parametrize(("method", "sign"), DENSE_CASES)
def test_dense_methods_agree_with_peft_merge_utils(tmp_path, method, sign):
    from peft.utils import merge_utils

    emb = {"model.embed_tokens": (64, 32)}
    a = peft_adapter(tmp_path / "a", llama(("q_proj", "v_proj"), layers=(0,)), rank=4, alpha=8, rslora=True, seed=9,
                     embeddings=emb)
    b = peft_adapter(tmp_path / "b", llama(("q_proj", "down_proj"), layers=(0,)), rank=2, alpha=4, seed=10,
                     embeddings=emb)
    specs, weights, density, seed, k = [a, b], [0.8, -0.6], 0.4, 1234, 3
    report = combine([a.path, b.path], tmp_path / "out", weights=weights, method=method, rank=k, density=density,
                     majority_sign=sign, seed=seed if method.startswith("dare") else None)
    out = read_out(tmp_path / "out")
    order = _header_order(a) + [n for n in _header_order(b) if n not in a.modules]
    assert [m.name for m in report.modules] == order
    torch.manual_seed(seed)
    for name in order:
        holders = [(s, w) for s, w in zip(specs, weights) if name in s.modules]
        tensors = [_peft_layout_delta(s, name) for s, _ in holders]
        w = torch.tensor([w for _, w in holders])
        fn = getattr(merge_utils, method)
        merged = fn(tensors, w, density, sign) if method in ("ties", "dare_ties") else fn(tensors, w, density)
        merged = merged.T if name in a.embeddings else merged  # back to the (out, in) layout of up @ down
        ref, _ = best_rank_k(merged.double().numpy(), k)
        up, down, scale = out[name]
        assert up.shape[1] == k
        assert rel(dense(up, down, scale), ref) <= 1e-5, name


def test_dare_seed_reproduces_and_matters(tmp_path):
    a = peft_adapter(tmp_path / "a", llama(("q_proj",), layers=(0,)), seed=11)
    b = peft_adapter(tmp_path / "b", llama(("q_proj",), layers=(0,)), seed=12)
    runs = {}
    for tag, seed in (("x", 5), ("y", 5), ("z", 6)):
        report = combine([a.path, b.path], tmp_path / tag, weights=[1, 1], method="dare_linear", density=0.5, seed=seed)
        assert report.seed == seed
        runs[tag] = load_file(str(tmp_path / tag / "adapter_model.safetensors"))
    assert all(torch.equal(runs["x"][key], runs["y"][key]) for key in runs["x"])
    assert not all(torch.equal(runs["x"][key], runs["z"][key]) for key in runs["x"])
    drawn = combine([a.path, b.path], tmp_path / "d", weights=[1, 1], method="dare_ties", density=0.5)
    assert isinstance(drawn.seed, int)  # drawn when not given, and reported so it can be reproduced


# ---------------------------------------------------------------------------------------------
# linear: peft's factor averaging (inexact by design)


def test_linear_averages_factors_as_peft_does(tmp_path):
    shapes = llama(("q_proj", "v_proj"), layers=(0,))
    a = peft_adapter(tmp_path / "a", shapes, rank=4, alpha=8, rslora=True, seed=13)
    b = peft_adapter(tmp_path / "b", shapes, rank=4, alpha=2, seed=14)
    weights = [0.6, -0.9]
    report = combine([a.path, b.path], tmp_path / "o", weights=weights, method="linear")
    out = read_out(tmp_path / "o")
    for name in shapes:
        cs = [w * s.modules[name][2] for s, w in zip((a, b), weights)]
        up = sum(math.sqrt(abs(c)) * s.modules[name][0].astype(np.float64) for s, c in zip((a, b), cs))
        down = sum(math.copysign(math.sqrt(abs(c)), c) * s.modules[name][1].astype(np.float64)
                   for s, c in zip((a, b), cs))
        assert rel(dense(*out[name]), up @ down) <= 1e-6
    assert report.max_rel_error > 0.1  # not the weighted sum
    assert any("linear averages factors" in w for w in report.warnings)


def test_linear_needs_equal_ranks(tmp_path):
    a = peft_adapter(tmp_path / "a", llama(("q_proj",), layers=(0,)), rank=4, seed=15)
    b = peft_adapter(tmp_path / "b", llama(("q_proj",), layers=(0,)), rank=2, seed=16)
    with pytest.raises(IncompatibleError, match=r"needs one rank, got \[2, 4\]"):
        combine([a.path, b.path], tmp_path / "o", weights=[1, 1], method="linear")
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------
# identity, refusals


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fmt=st.sampled_from(["peft", "kohya"]),
    out_f=st.integers(1, 12),
    in_f=st.integers(1, 12),
    kernel=st.sampled_from([(), (1, 1), (3, 3)]),
    rank=st.integers(1, 6),
    alpha=st.floats(0.25, 64),
    rslora=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_one_adapter_with_weight_one_is_the_identity(fmt, out_f, in_f, kernel, rank, alpha, rslora, seed):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if fmt == "peft":
            spec = peft_adapter(root / "a", {"model.layers.0.mlp.up_proj": (out_f, in_f)}, rank=rank, alpha=alpha,
                                rslora=rslora, seed=seed)
        else:
            spec = kohya_adapter(root / "a.safetensors", {"lora_unet_x_conv": (out_f, in_f, *kernel)}, rank=rank,
                                 alpha=alpha, seed=seed)
        (name, m), = spec.modules.items()
        ref = dense(*m)
        # float32 factors carry rounding relative to their own size, so the bound is relative to
        # scale·||up||·||down|| (= ||ΔW|| unless the product cancels, as it can for tiny layers)
        size = m[2] * np.linalg.norm(m[0]) * np.linalg.norm(m[1])
        out = root / ("o" if fmt == "peft" else "o.safetensors")
        combine([spec.path], out, weights=[1.0], method="cat")
        got = read_out(out)[name]
        assert np.linalg.norm(dense(*got) - ref) <= 1e-6 * size
        combine([spec.path], out, weights=[1.0], method="svd", force=True)
        got = read_out(out)[name]
        assert np.linalg.norm(dense(*got) - ref) <= 1e-5 * size


def test_dora_inputs_are_refused(tmp_path):
    with pytest.raises(IncompatibleError, match="DoRA") as exc:
        combine([FIXTURES / "peft_llama", FIXTURES / "peft_dora"], tmp_path / "o", weights=[1, 1], method="cat")
    assert "peft_dora" in str(exc.value) and exc.value.hint
    assert not (tmp_path / "o").exists()
    sd = {"lora_unet_x_to_q.lora_down.weight": torch.randn(2, 8), "lora_unet_x_to_q.lora_up.weight": torch.randn(8, 2),
          "lora_unet_x_to_q.dora_scale": torch.rand(8, 1)}
    save_file(sd, str(tmp_path / "dora.safetensors"))
    with pytest.raises(IncompatibleError, match="DoRA"):
        combine([tmp_path / "dora.safetensors"] * 2, tmp_path / "k.safetensors", weights=[1, 1], method="svd")


def test_modules_to_save_are_refused(tmp_path):
    with pytest.raises(IncompatibleError, match="modules_to_save"):
        combine([FIXTURES / "peft_cls", FIXTURES / "peft_cls"], tmp_path / "o", weights=[1, 1], method="cat")


# ---------------------------------------------------------------------------------------------
# real clients: peft loads the output and gives the expected forward pass; add_weighted_adapter parity


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _load_peft(model, path, name="default"):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(model, str(path), adapter_name=name).eval()


@pytest.mark.slow
@pytest.mark.parametrize(("method", "rank"), [("cat", None), ("svd", 12)])
def test_output_loads_in_peft_and_gives_the_weighted_sum_forward(tmp_path, method, rank):
    a_shapes = llama(("q_proj", "v_proj", "down_proj"))
    a = peft_adapter(tmp_path / "a", a_shapes, rank={n: 6 if "down" in n else 4 for n in a_shapes}, alpha=8,
                     rslora=True, seed=17)
    b_shapes = llama(("q_proj", "k_proj", "up_proj"), layers=(1,))
    b = peft_adapter(tmp_path / "b", b_shapes, rank=2, alpha={n: 1.0 if "k_proj" in n else 4.0 for n in b_shapes},
                     seed=18)
    weights = [0.6, -0.4]
    # rank 12 >= every module's rank sum, so svd is exact here too
    combine([a.path, b.path], tmp_path / "out", weights=weights, method=method, rank=rank)

    inputs = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    reference = copy.deepcopy(_tiny_llama())
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for name in set(a.modules) | set(b.modules):
            params[name + ".weight"] += torch.from_numpy(weighted_sum([a, b], weights, name)).float()
        expected = reference(input_ids=inputs).logits
        model = _load_peft(_tiny_llama(), tmp_path / "out")
        got = model(input_ids=inputs).logits
        plain = _tiny_llama()(input_ids=inputs).logits
    assert not torch.allclose(plain, expected, atol=1e-3)  # the adapters do something
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(("ours", "theirs"), [("cat", "cat"), ("svd", "svd"), ("ties", "ties_svd"),
                                              ("magnitude_prune", "magnitude_prune_svd")])
def test_same_factors_product_as_peft_add_weighted_adapter(tmp_path, ours, theirs):
    """peft's cat / *_svd types on the same model and adapters give the same B @ A per module.

    (Only the product of the factors: peft writes lora_alpha = r with the first adapter's
    use_rslora, so its scale is wrong when that adapter is rsLoRA. DARE is covered above: peft's
    draw order follows named_modules, not the file.)"""
    shapes = llama(("q_proj", "v_proj", "down_proj"))
    a = peft_adapter(tmp_path / "a", shapes, rank=4, alpha=8, rslora=True, seed=19)
    b = peft_adapter(tmp_path / "b", llama(("q_proj", "down_proj")), rank=4, alpha=2, seed=20)
    weights, k, density = [0.7, -0.5], 3, 0.5
    dense_method = ours in ("ties", "magnitude_prune")
    combine([a.path, b.path], tmp_path / "out", weights=weights, method=ours, rank=None if ours == "cat" else k,
            density=density if dense_method else None)
    out = read_out(tmp_path / "out")

    # adapter names: peft warns that a name inside "lora_" (such as "a") may be re-initialised on load
    model = _load_peft(_tiny_llama(), a.path, "one")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.load_adapter(str(b.path), adapter_name="two")
        model.add_weighted_adapter(["one", "two"], weights, "mix", combination_type=theirs,
                                   svd_rank=None if theirs == "cat" else k, density=density if dense_method else None)
    checked = 0
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "mix" in module.lora_A:
            ba = (module.lora_B["mix"].weight @ module.lora_A["mix"].weight).double().detach().numpy()
            up, down, scale = out[name]
            assert rel(dense(up, down, scale), ba) <= 1e-5, name
            checked += 1
    assert checked == len(out) == len(shapes)


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_table_summary_and_json(tmp_path):
    specs = two_kohya_inputs(tmp_path)
    args = ["combine", str(specs[0].path), str(specs[1].path), "--weights", "-1,0.5", "--method", "svd", "--rank", "2"]
    r = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "o.safetensors")])
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert "lora_unet_in_blocks_1_conv1" in r.output and "4 + 2" in r.output
    assert lines[-1].startswith(f"Wrote {tmp_path / 'o.safetensors'} (4 modules, rank 2, ")
    r = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "j.safetensors"), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["schema"] == 1 and doc["method"] == "svd" and doc["weights"] == [-1.0, 0.5]
    assert set(doc["modules"][0]) == {"name", "input_ranks", "rank", "fro_retained", "rel_error"}
    te = next(m for m in doc["modules"] if m["name"].startswith("lora_te1"))
    assert te["input_ranks"] == [None, 3]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--weights", "1", "--method", "cat"], "--weights has 1 value(s) but 2 adapter(s)"),
        (["--weights", "1,x", "--method", "cat"], "expected comma-separated numbers"),
        (["--weights", "1,nan", "--method", "cat"], "not a finite number"),
        (["--weights", "1,1", "--method", "cat", "--rank", "4"], "--rank does not apply to --method cat"),
        (["--weights", "1,1", "--method", "linear", "--rank", "4"], "--rank does not apply to --method linear"),
        (["--weights", "1,1", "--method", "svd", "--rank", "0"], "--rank 0: must be at least 1"),
        (["--weights", "1,1", "--method", "ties"], "--method ties needs --density"),
        (["--weights", "1,1", "--method", "dare_ties", "--density", "0"], "--density 0.0: must be in (0, 1]"),
        (["--weights", "1,1", "--method", "ties", "--density", "1.5"], "--density 1.5: must be in (0, 1]"),
        (["--weights", "1,1", "--method", "svd", "--density", "0.5"], "--density does not apply to --method svd"),
        (["--weights", "1,1", "--method", "ties", "--density", "0.5", "--seed", "1"],
         "--seed does not apply to --method ties"),
        (["--weights", "1,1", "--method", "svd", "--majority-sign", "frequency"],
         "--majority-sign does not apply to --method svd"),
        (["--weights", "1,1", "--method", "dare_linear", "--density", "0.5", "--seed", "-1"], "--seed -1"),
    ],
)
def test_cli_bad_options_exit_2_without_output(tmp_path, capsys, args, needle):
    specs = two_kohya_inputs(tmp_path)
    code, out, err = run_cli(["combine", str(specs[0].path), str(specs[1].path), "-o",
                                       str(tmp_path / "o.safetensors"), *args])
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and needle in errors[0], err
    assert "Traceback" not in err and out == ""
    assert not (tmp_path / "o.safetensors").exists()


def test_cli_dora_exit_2_with_one_error_line(tmp_path, capsys):
    code, out, err = run_cli(["combine", str(FIXTURES / "peft_llama"), str(FIXTURES / "peft_dora"),
                                       "-o", str(tmp_path / "o"), "--weights", "1,1", "--method", "cat"])
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert lines[0].startswith("Error: ") and "DoRA" in lines[0] and "peft_dora" in lines[0]
    assert lines[1].startswith("Hint: ") and len(lines) == 2
    assert not (tmp_path / "o").exists()


def test_cli_needs_two_adapters_and_respects_force(tmp_path, capsys):
    specs = two_kohya_inputs(tmp_path)
    code, _, err = run_cli(["combine", str(specs[0].path), "-o", str(tmp_path / "o.safetensors"),
                                     "--weights", "1", "--method", "cat"])
    assert code == 2 and "at least two adapters" in err and "loratool rescale" in err
    target = tmp_path / "o.safetensors"
    target.write_bytes(b"keep me")
    base = ["combine", str(specs[0].path), str(specs[1].path), "-o", str(target), "--weights", "1,1", "--method", "cat"]
    code, _, err = run_cli(base)
    assert code == 2 and target.read_bytes() == b"keep me"
    code, _, _ = run_cli([*base, "--force", "-q"])
    assert code == 0
    with safe_open(str(target), "pt") as f:
        assert "lora_unet_in_blocks_0_attn1_to_q.lora_up.weight" in f.keys()  # noqa: SIM118


def test_lora_bias_is_summed_exactly_and_kohya_keeps_it(tmp_path):
    specs, biases = [], []
    for i, (rank, alpha, rslora) in enumerate(((4, 8.0, True), (2, 1.0, False))):
        spec = peft_adapter(tmp_path / f"in{i}", llama(("q_proj",), layers=(0,)), rank=rank, alpha=alpha,
                            rslora=rslora, seed=21 + i)
        sd = load_file(str(spec.path / "adapter_model.safetensors"))
        bias = torch.randn(32, generator=torch.Generator().manual_seed(i))
        sd[f"{PREFIX}model.layers.0.self_attn.q_proj.lora_B.bias"] = bias
        save_file(sd, str(spec.path / "adapter_model.safetensors"), metadata={"format": "pt"})
        cfg = json.loads((spec.path / "adapter_config.json").read_text())
        (spec.path / "adapter_config.json").write_text(json.dumps({**cfg, "lora_bias": True}))
        specs.append(spec)
        biases.append(bias.double().numpy())
    weights = [0.5, -2.0]
    combine([s.path for s in specs], tmp_path / "o", weights=weights, method="svd", rank=2)
    sd = load_file(str(tmp_path / "o" / "adapter_model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    ref = sum(w * s.modules[name][2] * b for s, w, b in zip(specs, weights, biases))
    np.testing.assert_allclose(sd[f"{PREFIX}{name}.lora_B.bias"].double().numpy(), ref, rtol=1e-6, atol=1e-7)
    assert json.loads((tmp_path / "o" / "adapter_config.json").read_text())["lora_bias"] is True
    # kohya keeps the summed bias as ComfyUI's unscaled .diff_b (issue #15), never drops it
    combine([s.path for s in specs], tmp_path / "k.safetensors", weights=weights, method="cat", fmt="kohya")
    kd = load_file(str(tmp_path / "k.safetensors"))
    np.testing.assert_allclose(kd["lora_unet_model_layers_0_self_attn_q_proj.diff_b"].double().numpy(), ref,
                               rtol=1e-6, atol=1e-7)


def test_provenance_names_inputs_without_absolute_paths(tmp_path):
    specs = two_kohya_inputs(tmp_path)
    combine([s.path for s in specs], tmp_path / "o.safetensors", weights=[0.5, 0.5], method="svd", rank=2)
    with safe_open(str(tmp_path / "o.safetensors"), "pt") as f:
        meta = f.metadata()
    params = json.loads(meta["loratool.params"])
    assert meta["loratool.op"] == "combine"
    assert params["method"] == "svd" and params["weights"] == [0.5, 0.5] and params["rank"] == 2
    assert all(not p.startswith("/") for p in params["inputs"]) and len(params["inputs"]) == 2
    assert str(tmp_path) not in json.dumps(meta)
