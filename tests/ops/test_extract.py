"""extract: known low-rank deltas are recovered (numpy), merged back (merge), and loaded by peft.

Expected values come from the constructions (numpy deltas, numpy SVDs) and from peft, never from
loratool: the written adapters are read back with safetensors + json and peft's own pattern rule.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from clirun import run_cli
from peft.utils.other import get_pattern_key
from safetensors.numpy import load_file, save_file

from loratool.ops.extract import extract
from loratool.ops.merge import merge

PREFIX = "base_model.model."


def low_rank(rng: np.random.Generator, rows: int, cols: int, rank: int, scale: float = 0.05) -> np.ndarray:
    """A (rows, cols) float32 matrix of exactly rank `rank`: B @ A."""
    b = rng.standard_normal((rows, rank)).astype(np.float32)
    a = rng.standard_normal((rank, cols)).astype(np.float32)
    return (b @ a * (scale / rank**0.5)).astype(np.float32)


def with_spectrum(rng: np.random.Generator, rows: int, cols: int, sigma: list[float]) -> np.ndarray:
    """U diag(sigma) Vᵀ with random orthonormal U, V: a matrix with exactly these singular values."""
    u, _ = np.linalg.qr(rng.standard_normal((rows, len(sigma))))
    v, _ = np.linalg.qr(rng.standard_normal((cols, len(sigma))))
    return ((u * np.asarray(sigma)) @ v.T).astype(np.float32)


def peft_deltas(path: Path) -> dict[str, np.ndarray]:
    """Every module's ΔW in the base weight's layout, from the PEFT files and peft's pattern rule."""
    cfg = json.loads((path / "adapter_config.json").read_text())
    t = load_file(str(path / "adapter_model.safetensors"))
    out = {}
    for key, a in t.items():
        for suffix, embedding in ((".lora_A.weight", False), (".lora_embedding_A", True)):
            if not key.endswith(suffix):
                continue
            stem = key[: -len(suffix)]
            b = t[stem + (".lora_embedding_B" if embedding else ".lora_B.weight")]
            name = stem.removeprefix(PREFIX)
            r = cfg["rank_pattern"].get(get_pattern_key(list(cfg["rank_pattern"]), name), cfg["r"])
            alpha = cfg["alpha_pattern"].get(get_pattern_key(list(cfg["alpha_pattern"]), name), cfg["lora_alpha"])
            assert a.shape[0] == r, (name, a.shape, r)  # peft would refuse the adapter otherwise
            scale = alpha / (r**0.5 if cfg["use_rslora"] else r)
            d = (b.reshape(b.shape[0], r).astype(np.float64) @ a.reshape(r, -1).astype(np.float64)) * scale
            out[name] = d.T if embedding else d.reshape(b.shape[0], *a.shape[1:])
    return out


def assert_close(got: np.ndarray, want: np.ndarray, tol: float, what: str = "") -> None:
    err = float(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max())
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:g}"


# ---------------------------------------------------------------------------------------------
# synthetic checkpoints (safetensors written directly)


@pytest.fixture
def pair(tmp_path):
    """A base with linear, conv, norm and bias tensors, and a tuned copy with rank-4 deltas on two layers."""
    rng = np.random.default_rng(0)
    base = {
        "blocks.0.attn.q.weight": rng.standard_normal((48, 32)).astype(np.float32) * 0.1,
        "blocks.0.attn.q.bias": rng.standard_normal(48).astype(np.float32) * 0.1,
        "blocks.0.attn.k.weight": rng.standard_normal((48, 32)).astype(np.float32) * 0.1,
        "blocks.0.conv.weight": rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * 0.1,
        "blocks.0.norm.weight": np.ones(32, np.float32),
        "blocks.1.attn.q.weight": rng.standard_normal((48, 32)).astype(np.float32) * 0.1,
        "blocks.1.attn.k.weight": rng.standard_normal((48, 32)).astype(np.float32) * 0.1,
    }
    deltas = {
        "blocks.0.attn.q": low_rank(rng, 48, 32, 4),
        "blocks.0.conv": low_rank(rng, 16, 8 * 9, 4).reshape(16, 8, 3, 3),
        "blocks.1.attn.k": low_rank(rng, 48, 32, 4),
    }
    tuned = dict(base)
    for name, d in deltas.items():
        tuned[name + ".weight"] = (base[name + ".weight"] + d).astype(np.float32)
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    exact = {n: tuned[n + ".weight"].astype(np.float64) - base[n + ".weight"] for n in deltas}
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", exact, base, tuned


def test_recovers_exactly_the_changed_modules(pair, tmp_path):
    base, tuned, exact, _, _ = pair
    report = extract(base, tuned, tmp_path / "out", rank=4)
    got = peft_deltas(tmp_path / "out")
    assert set(got) == set(exact)  # unchanged weights (and the unchanged norm and bias) are absent
    for name, d in exact.items():
        assert_close(got[name], d, 1e-6, name)
    rows = {m.name: m for m in report.modules}
    assert rows["blocks.0.conv"].kind == "conv" and rows["blocks.0.attn.q"].kind == "linear"
    assert all(m.rank == 4 and m.method == "exact" and m.kept_energy > 1 - 1e-6 for m in rows.values())
    assert report.unchanged == 4 and report.changed == []
    raw = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert raw[PREFIX + "blocks.0.conv.lora_A.weight"].shape == (4, 8, 3, 3)
    assert raw[PREFIX + "blocks.0.conv.lora_B.weight"].shape == (16, 4, 1, 1)
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 4 and cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}
    # the short names q, k, conv would also wrap blocks.1.attn.q and blocks.0.attn.k: exact paths instead
    assert cfg["target_modules"] == sorted(exact)


def test_factor_split_is_balanced(pair, tmp_path):
    """up = U_k·sqrt(S_k), down = sqrt(S_k)·Vh_k: both factors carry the same singular values."""
    base, tuned, exact, _, _ = pair
    extract(base, tuned, tmp_path / "out", rank=4)
    raw = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    up = raw[PREFIX + "blocks.0.attn.q.lora_B.weight"].astype(np.float64)
    down = raw[PREFIX + "blocks.0.attn.q.lora_A.weight"].astype(np.float64)
    sigma = np.linalg.svd(exact["blocks.0.attn.q"], compute_uv=False)[:4]
    assert_close(np.linalg.norm(up, axis=0), np.sqrt(sigma), 1e-5, "up columns")
    assert_close(np.linalg.norm(down, axis=1), np.sqrt(sigma), 1e-5, "down rows")
    assert_close(up.T @ up, np.diag(sigma), 1e-5, "up orthogonal")


def test_merge_reproduces_tuned(pair, tmp_path):
    base, tuned, _, _, tuned_t = pair
    extract(base, tuned, tmp_path / "out", rank=4)
    merge(base, [tmp_path / "out"], tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    for key, t in tuned_t.items():
        assert_close(merged[key], t, 1e-6, key)


def test_provenance_hashes_both_checkpoints(pair, tmp_path):
    import hashlib

    from safetensors import safe_open

    base, tuned, _, _, _ = pair
    extract(base, tuned, tmp_path / "out", rank=4)
    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), "np") as f:
        meta = f.metadata()
    assert meta["loratool.op"] == "extract"
    sources = json.loads(meta["loratool.sources"])
    assert sources == {f"{p.parent.name}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest() for p in (base, tuned)}
    params = json.loads(meta["loratool.params"])
    assert params["rank"] == 4 and params["base"] == f"{base.parent.name}/{base.name}"  # no absolute paths


def test_threshold_picks_the_smallest_rank(tmp_path):
    rng = np.random.default_rng(1)
    sigma = [8.0, 4.0, 2.0, 1.0, 0.5, 0.25]
    base = {"a.weight": np.zeros((40, 30), np.float32), "b.weight": np.zeros((20, 30), np.float32)}
    tuned = {"a.weight": with_spectrum(rng, 40, 30, sigma), "b.weight": with_spectrum(rng, 20, 30, [1.0, 1.0, 1.0])}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    energy = np.cumsum(np.square(sigma)) / np.sum(np.square(sigma))
    for t in (0.5, 0.76, float(energy[2]), 0.999, 1.0):
        want = int(np.argmax(energy >= t * (1 - 1e-6))) + 1  # smallest k whose share reaches t
        report = extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / f"o{t}",
                         threshold=t)
        rows = {m.name: m for m in report.modules}
        assert rows["a"].rank == want, t
        assert rows["a"].kept_energy == pytest.approx(energy[want - 1], abs=1e-6)
        assert rows["b"].rank == (int(np.ceil(t * 3 - 1e-5)) or 1)  # three equal singular values
        got = peft_deltas(tmp_path / f"o{t}")
        assert got["a"].shape == (40, 30)
    # --rank caps the threshold's choice
    report = extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "capped",
                     threshold=0.999, rank=2)
    assert {m.name: m.rank for m in report.modules} == {"a": 2, "b": 2}
    cfg = json.loads((tmp_path / "capped" / "adapter_config.json").read_text())
    assert cfg["r"] == 2


def test_threshold_ranks_go_to_rank_pattern(tmp_path):
    rng = np.random.default_rng(2)
    base = {f"l{i}.weight": np.zeros((24, 24), np.float32) for i in range(3)}
    tuned = {"l0.weight": with_spectrum(rng, 24, 24, [1.0]), "l1.weight": with_spectrum(rng, 24, 24, [1.0]),
             "l2.weight": with_spectrum(rng, 24, 24, [1.0, 1.0, 1.0])}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "out", threshold=0.99)
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    got = peft_deltas(tmp_path / "out")  # resolves each module's rank and alpha as peft does
    for name in ("l0", "l1", "l2"):
        assert_close(got[name], tuned[name + ".weight"], 1e-6, name)
    # r is the largest rank; the smaller ones go to rank_pattern (alpha = rank per module)
    assert cfg["r"] == 3 and sorted(cfg["rank_pattern"].values()) == [1, 1]


def test_randomized_svd_agrees_with_exact(tmp_path):
    rng = np.random.default_rng(3)
    rows, cols, k = 420, 360, 12
    d = low_rank(rng, rows, cols, k, scale=0.5) + rng.standard_normal((rows, cols)).astype(np.float32) * 1e-4
    save_file({"big.weight": np.zeros((rows, cols), np.float32)}, str(tmp_path / "base.safetensors"))
    save_file({"big.weight": d}, str(tmp_path / "tuned.safetensors"))
    b, t = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    fast = extract(b, t, tmp_path / "fast", rank=k, exact_max_dim=100)  # smaller side 360 > 100: randomized
    slow = extract(b, t, tmp_path / "slow", rank=k)
    assert fast.modules[0].method == "randomized" and slow.modules[0].method == "exact"
    u, s, vh = np.linalg.svd(d.astype(np.float64), full_matrices=False)
    best = (u[:, :k] * s[:k]) @ vh[:k]  # Eckart-Young: the best rank-k approximation
    scale = np.abs(best).max()
    assert_close(peft_deltas(tmp_path / "fast")["big"], best, 1e-4 * scale, "randomized")
    assert_close(peft_deltas(tmp_path / "slow")["big"], best, 1e-4 * scale, "exact")
    share = float(np.sum(s[:k] ** 2) / np.sum(s**2))
    assert fast.modules[0].kept_energy == pytest.approx(share, abs=1e-6)
    # a threshold on the randomized path: the sketch grows until the share is met
    for threshold in (0.9, 0.999999):
        report = extract(b, t, tmp_path / f"thr{threshold}", threshold=threshold, exact_max_dim=100)
        want = int(np.argmax(np.cumsum(s**2) / np.sum(s**2) >= threshold)) + 1
        assert report.modules[0].method == "randomized" and report.modules[0].rank == want, threshold


def test_large_matrices_take_the_randomized_svd(tmp_path):
    rng = np.random.default_rng(5)
    d = low_rank(rng, 1100, 1040, 6, scale=0.5)  # smaller side 1040 > 1024: randomized by default
    save_file({"big.weight": np.zeros_like(d)}, str(tmp_path / "base.safetensors"))
    save_file({"big.weight": d}, str(tmp_path / "tuned.safetensors"))
    report = extract(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "out", rank=6)
    assert report.modules[0].method == "randomized"
    assert_close(peft_deltas(tmp_path / "out")["big"], d, 1e-5 * np.abs(d).max(), "big")


def test_save_changed_stores_norm_and_bias(pair, tmp_path):
    base, tuned, _exact, base_t, tuned_t = pair
    tuned_t = dict(tuned_t)
    tuned_t["blocks.0.norm.weight"] = (base_t["blocks.0.norm.weight"] * 1.1).astype(np.float32)
    tuned_t["blocks.0.attn.q.bias"] = (base_t["blocks.0.attn.q.bias"] + 0.01).astype(np.float32)
    save_file(tuned_t, str(tuned))
    report = extract(base, tuned, tmp_path / "plain", rank=4)
    assert {c.key: c.action for c in report.changed} == {"blocks.0.norm.weight": "skipped",
                                                        "blocks.0.attn.q.bias": "skipped"}
    assert "--save-changed" in report.changed[0].reason
    raw = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    assert not any("norm" in k or "bias" in k for k in raw)

    report = extract(base, tuned, tmp_path / "saved", rank=4, save_changed=True)
    assert {c.key: c.action for c in report.changed} == {"blocks.0.norm.weight": "saved",
                                                        "blocks.0.attn.q.bias": "bias"}
    raw = load_file(str(tmp_path / "saved" / "adapter_model.safetensors"))
    np.testing.assert_array_equal(raw[PREFIX + "blocks.0.norm.weight"], tuned_t["blocks.0.norm.weight"])
    assert_close(raw[PREFIX + "blocks.0.attn.q.lora_B.bias"],
                 tuned_t["blocks.0.attn.q.bias"].astype(np.float64) - base_t["blocks.0.attn.q.bias"], 1e-7)
    cfg = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["blocks.0.norm"] and cfg["lora_bias"] is True
    merge(base, [tmp_path / "saved"], tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    for key, t in tuned_t.items():
        assert_close(merged[key], t, 1e-6, key)


def test_embeddings_only_when_asked(tmp_path):
    rng = np.random.default_rng(4)
    vocab, dim = 50, 16
    base = {"model.embed_tokens.weight": rng.standard_normal((vocab, dim)).astype(np.float32),
            "lm_head.weight": rng.standard_normal((vocab, dim)).astype(np.float32),
            "model.proj.weight": rng.standard_normal((dim, dim)).astype(np.float32)}
    d_emb, d_head, d_proj = low_rank(rng, vocab, dim, 3), low_rank(rng, vocab, dim, 2), low_rank(rng, dim, dim, 2)
    tuned = {"model.embed_tokens.weight": base["model.embed_tokens.weight"] + d_emb,
             "lm_head.weight": base["lm_head.weight"] + d_head, "model.proj.weight": base["model.proj.weight"] + d_proj}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    b, t = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"
    report = extract(b, t, tmp_path / "without", rank=3)
    assert [m.name for m in report.modules] == ["model.proj"]
    assert {c.key for c in report.changed if c.action == "skipped"} == {"model.embed_tokens.weight", "lm_head.weight"}
    report = extract(b, t, tmp_path / "with", rank=3, embeddings=True)
    assert {m.name: m.kind for m in report.modules} == {"model.embed_tokens": "embedding", "lm_head": "linear",
                                                        "model.proj": "linear"}
    raw = load_file(str(tmp_path / "with" / "adapter_model.safetensors"))
    assert raw[PREFIX + "model.embed_tokens.lora_embedding_A"].shape == (3, vocab)  # (r, vocab)
    assert raw[PREFIX + "model.embed_tokens.lora_embedding_B"].shape == (dim, 3)  # (dim, r)
    assert raw[PREFIX + "lm_head.lora_A.weight"].shape == (3, dim)
    got = peft_deltas(tmp_path / "with")
    for name, d in (("model.embed_tokens", d_emb), ("lm_head", d_head), ("model.proj", d_proj)):
        want = tuned[name + ".weight"].astype(np.float64) - base[name + ".weight"]
        assert_close(got[name], want, 1e-6, name)
        assert_close(want, d, 1e-5, name)
    cfg = json.loads((tmp_path / "with" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["embed_tokens", "lm_head", "proj"]  # they cover exactly these modules


def test_lora_bias_is_not_mixed_with_embedding_lora(tmp_path):
    rng = np.random.default_rng(6)
    base = {"embed_tokens.weight": rng.standard_normal((40, 8)).astype(np.float32),
            "q.weight": rng.standard_normal((8, 8)).astype(np.float32), "q.bias": np.zeros(8, np.float32)}
    tuned = {"embed_tokens.weight": base["embed_tokens.weight"] + low_rank(rng, 40, 8, 2),
             "q.weight": base["q.weight"] + low_rank(rng, 8, 8, 2), "q.bias": np.ones(8, np.float32)}
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file(tuned, str(tmp_path / "t.safetensors"))
    report = extract(tmp_path / "b.safetensors", tmp_path / "t.safetensors", tmp_path / "out", rank=2,
                     embeddings=True, save_changed=True)
    (row,) = report.changed
    assert row.key == "q.bias" and row.action == "skipped" and "lora_bias" in row.reason
    assert not any(k.endswith(".bias") for k in load_file(str(tmp_path / "out" / "adapter_model.safetensors")))


def test_sharded_base_and_single_file_tuned(pair, tmp_path):
    _, tuned, exact, base_t, _ = pair
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    keys = list(base_t)
    files = {k: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, k in enumerate(keys)}
    for f in set(files.values()):
        save_file({k: base_t[k] for k in keys if files[k] == f}, str(shard_dir / f))
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": files}))
    extract(shard_dir, tuned, tmp_path / "out", rank=4)
    got = peft_deltas(tmp_path / "out")
    assert set(got) == set(exact)
    for name, d in exact.items():
        assert_close(got[name], d, 1e-6, name)


def test_kohya_output(pair, tmp_path):
    base, tuned, exact, _, tuned_t = pair
    extract(base, tuned, tmp_path / "out.safetensors", rank=4, fmt="kohya")
    raw = load_file(str(tmp_path / "out.safetensors"))
    stems = {"lora_unet_" + n.replace(".", "_"): n for n in exact}
    assert set(raw) == {s + suffix for s in stems for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha")}
    for stem, name in stems.items():
        alpha = raw[stem + ".alpha"]
        assert alpha.dtype == np.float32 and alpha.shape == () and float(alpha) == 4.0
        up, down = raw[stem + ".lora_up.weight"], raw[stem + ".lora_down.weight"]
        d = (up.reshape(up.shape[0], -1).astype(np.float64) @ down.reshape(4, -1)) * float(alpha) / 4
        assert_close(d.reshape(exact[name].shape), exact[name], 1e-6, name)
    merge(base, [tmp_path / "out.safetensors"], tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    for key, t in tuned_t.items():
        assert_close(merged[key], t, 1e-6, key)


def test_kohya_extract_from_a_merged_sd_checkpoint_gives_kohya_names(tmp_path):
    """kohya_sd merged into base_sd (a single-file SDXL-style checkpoint), extracted as kohya: the
    same module names as the adapter (`model.diffusion_model.` -> `lora_unet_`, the text encoder's
    container -> `lora_te1_`), and deltas within the fp16 rounding of the merged weights."""
    fixtures = Path(__file__).resolve().parents[2] / "fixtures"
    merge(fixtures / "base_sd.safetensors", [fixtures / "kohya_sd.safetensors"], tmp_path / "merged.safetensors")
    extract(fixtures / "base_sd.safetensors", tmp_path / "merged.safetensors", tmp_path / "out.safetensors",
            rank=8, fmt="kohya")
    src = load_file(str(fixtures / "kohya_sd.safetensors"))
    out = load_file(str(tmp_path / "out.safetensors"))
    stems = {k.removesuffix(".lora_down.weight") for k in src if k.endswith(".lora_down.weight")}
    assert {k.removesuffix(".lora_down.weight") for k in out if k.endswith(".lora_down.weight")} == stems
    for stem in stems:
        def delta(t, stem=stem):
            up, down = t[stem + ".lora_up.weight"].astype(np.float64), t[stem + ".lora_down.weight"]
            r = down.shape[0]
            alpha = float(t[stem + ".alpha"]) if stem + ".alpha" in t else r
            return up.reshape(up.shape[0], r) @ down.reshape(r, -1).astype(np.float64) * alpha / r
        want = delta(src)
        assert_close(delta(out), want, 2e-3 * np.abs(want).max() + 1e-3, stem)  # fp16 merged weights


def test_modules_regex_selects(pair, tmp_path):
    base, tuned, _exact, _, _ = pair
    report = extract(base, tuned, tmp_path / "out", rank=4, modules=r"attn")
    assert sorted(m.name for m in report.modules) == ["blocks.0.attn.q", "blocks.1.attn.k"]


def test_cli_json(pair, tmp_path, capsys):
    base, tuned, exact, _, _ = pair
    code, out, err = run_cli(["extract", base, tuned, "-o", tmp_path / "out", "--rank", "4", "--json",
                                       "--device", "cpu"])
    assert code == 0, err
    doc = json.loads(out)
    assert doc["schema"] == 1 and doc["num_modules"] == 3 and doc["methods"] == {"exact": 3, "randomized": 0}
    assert {m["name"]: m["rank"] for m in doc["modules"]} == dict.fromkeys(exact, 4)
    assert set(doc["modules"][0]) == {"name", "kind", "shape", "rank", "kept_energy", "rel_error", "rel_change",
                                      "method", "bias"}
    code, out, err = run_cli(["extract", base, tuned, "-o", tmp_path / "out", "--rank", "4", "--force"])
    assert code == 0 and out.strip().splitlines()[-1].startswith(f"Wrote {tmp_path / 'out'} (3 modules, rank 4")


# ---------------------------------------------------------------------------------------------
# errors: exit 2, one Error line


def _error(capsys, args):
    code, _out, err = run_cli(args)
    lines = [ln for ln in err.splitlines() if ln.startswith("Error:")]
    assert code == 2 and len(lines) == 1, (code, err)
    return lines[0], err


def test_shape_mismatch_is_an_error(pair, tmp_path, capsys):
    base, tuned, _, _, tuned_t = pair
    tuned_t = dict(tuned_t)
    tuned_t["blocks.1.attn.q.weight"] = np.zeros((40, 32), np.float32)
    save_file(tuned_t, str(tuned))
    line, _ = _error(capsys, ["extract", base, tuned, "-o", tmp_path / "out", "--rank", "4"])
    assert "'blocks.1.attn.q.weight' is (48, 32)" in line and "(40, 32)" in line
    assert not (tmp_path / "out").exists()


def test_nothing_changed_is_an_error(pair, tmp_path, capsys):
    base, _, _, _, _ = pair
    line, err = _error(capsys, ["extract", base, base, "-o", tmp_path / "out", "--rank", "4"])
    assert "nothing to extract" in line and "Hint:" in err


def test_only_skipped_changes_is_an_error(tmp_path, capsys):
    base = {"n.weight": np.ones(8, np.float32), "l.weight": np.zeros((8, 8), np.float32)}
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file({**base, "n.weight": np.full(8, 2.0, np.float32)}, str(tmp_path / "t.safetensors"))
    line, _ = _error(capsys, ["extract", tmp_path / "b.safetensors", tmp_path / "t.safetensors", "-o",
                              tmp_path / "out", "--rank", "4"])
    assert "n.weight" in line and "--save-changed" in line


@pytest.mark.parametrize("extra, expected", [
    ([], "needs --rank K or --threshold T"),
    (["--rank", "0"], "--rank 0"),
    (["--threshold", "1.5"], "--threshold 1.5"),
    (["--threshold", "0"], "--threshold 0.0"),
    (["--rank", "4", "--modules", "("], "not a valid regular expression"),
    (["--rank", "4", "--modules", "nomatch"], "matches none"),
    (["--rank", "4", "--format", "kohya", "--save-changed"], "--save-changed"),
    (["--rank", "4", "--device", "nonsense"], "--device nonsense"),
])
def test_bad_options(pair, tmp_path, capsys, extra, expected):
    base, tuned, _, _, _ = pair
    line, _ = _error(capsys, ["extract", base, tuned, "-o", tmp_path / "out", *extra])
    assert expected in line


def test_existing_output_needs_force(pair, tmp_path, capsys):
    base, tuned, _, _, _ = pair
    (tmp_path / "out").mkdir()
    line, err = _error(capsys, ["extract", base, tuned, "-o", tmp_path / "out", "--rank", "4"])
    assert "already exists" in line and "--force" in err


# ---------------------------------------------------------------------------------------------
# a tiny transformers Llama: deltas, merge, and peft's forward pass


def _llama_config(**changes):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=96, tie_word_embeddings=False, **changes)


def _make_llama(tmp: Path, deltas, *, seed: int = 0, **config):
    """Save a random tiny Llama as BASE and BASE + deltas (key -> numpy array) as TUNED."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(_llama_config(**config)).eval()
    model.save_pretrained(tmp / "base")
    state = model.state_dict()
    with torch.no_grad():
        for key, d in deltas.items():
            state[key].add_(torch.from_numpy(d))
    model.save_pretrained(tmp / "tuned")
    return tmp / "base", tmp / "tuned"


def _logits(model, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _peft_logits(base_dir: Path, adapter: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), str(adapter)).eval()
    return _logits(model)


def _tuned_logits(tuned_dir: Path) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    return _logits(LlamaForCausalLM.from_pretrained(tuned_dir).eval())


@pytest.mark.slow
def test_llama_rank8_deltas_merge_and_peft(tmp_path):
    rng = np.random.default_rng(10)
    shapes = {"q_proj": (32, 32), "down_proj": (32, 64)}
    deltas = {}
    for layer in (0, 1):
        for short, (o, i) in shapes.items():
            part = "self_attn" if short == "q_proj" else "mlp"
            deltas[f"model.layers.{layer}.{part}.{short}.weight"] = low_rank(rng, o, i, 8, scale=0.2)
    base, tuned = _make_llama(tmp_path, deltas)
    out = tmp_path / "adapter"
    report = extract(base, tuned, out, rank=8)
    want = {k.removesuffix(".weight") for k in deltas}
    assert {m.name for m in report.modules} == want
    got = peft_deltas(out)
    assert set(got) == want
    for key, d in deltas.items():
        assert_close(got[key.removesuffix(".weight")], d, 1e-5, key)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["down_proj", "q_proj"]  # every q_proj and down_proj changed
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 8 and cfg["task_type"] == "CAUSAL_LM"

    merge(base, [out], tmp_path / "merged")
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    tuned_t = load_file(str(tuned / "model.safetensors"))
    assert set(merged) == set(tuned_t)
    for key, t in tuned_t.items():
        assert_close(merged[key], t, 1e-5, key)

    ours, theirs = _peft_logits(base, out), _tuned_logits(tuned)
    assert torch.allclose(ours, theirs, atol=1e-4), float((ours - theirs).abs().max())


@pytest.mark.slow
def test_llama_embeddings_and_saved_tensors_load_in_peft(tmp_path):
    rng = np.random.default_rng(11)
    deltas = {
        "model.embed_tokens.weight": low_rank(rng, 96, 32, 4, scale=0.5),
        "lm_head.weight": low_rank(rng, 96, 32, 4, scale=0.5),
        "model.layers.0.self_attn.q_proj.weight": low_rank(rng, 32, 32, 4, scale=0.2),
        "model.layers.1.self_attn.k_proj.bias": rng.standard_normal(16).astype(np.float32) * 0.1,
        "model.norm.weight": rng.standard_normal(32).astype(np.float32) * 0.1,
    }
    base, tuned = _make_llama(tmp_path, deltas, attention_bias=True)
    out = tmp_path / "adapter"
    report = extract(base, tuned, out, rank=4, embeddings=True, save_changed=True)
    assert {m.name: m.kind for m in report.modules} == {
        "model.embed_tokens": "embedding", "lm_head": "linear", "model.layers.0.self_attn.q_proj": "linear"}
    assert {c.key: c.action for c in report.changed} == {
        "model.layers.1.self_attn.k_proj.bias": "saved", "model.norm.weight": "saved"}
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(cfg["modules_to_save"]) == ["model.layers.1.self_attn.k_proj", "model.norm"]
    # modules_to_save replaces whole modules: k_proj's unchanged weight travels with its changed bias
    raw = load_file(str(out / "adapter_model.safetensors"))
    tuned_t = load_file(str(tuned / "model.safetensors"))
    for key in ("model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.k_proj.bias", "model.norm.weight"):
        np.testing.assert_array_equal(raw[PREFIX + key], tuned_t[key])
    assert cfg["target_modules"] == sorted(["model.embed_tokens", "lm_head", "model.layers.0.self_attn.q_proj"])
    got = peft_deltas(out)
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight"):
        assert_close(got[key.removesuffix(".weight")], deltas[key], 1e-5, key)

    ours, theirs = _peft_logits(base, out), _tuned_logits(tuned)
    assert torch.allclose(ours, theirs, atol=1e-4), float((ours - theirs).abs().max())
    merge(base, [out], tmp_path / "merged")
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    for key, t in load_file(str(tuned / "model.safetensors")).items():
        assert_close(merged[key], t, 1e-5, key)


@pytest.mark.slow
def test_llama_changed_bias_becomes_the_lora_bias(tmp_path):
    rng = np.random.default_rng(12)
    deltas = {
        "model.layers.0.self_attn.q_proj.weight": low_rank(rng, 32, 32, 4, scale=0.2),
        "model.layers.0.self_attn.q_proj.bias": rng.standard_normal(32).astype(np.float32) * 0.1,
        "model.layers.1.mlp.up_proj.weight": low_rank(rng, 64, 32, 4, scale=0.2),
    }
    base, tuned = _make_llama(tmp_path, deltas, attention_bias=True)
    out = tmp_path / "adapter"
    report = extract(base, tuned, out, rank=4, save_changed=True)
    assert [(c.key, c.action) for c in report.changed] == [("model.layers.0.self_attn.q_proj.bias", "bias")]
    raw = load_file(str(out / "adapter_model.safetensors"))
    assert_close(raw[PREFIX + "model.layers.0.self_attn.q_proj.lora_B.bias"],
                 deltas["model.layers.0.self_attn.q_proj.bias"], 1e-6)
    assert json.loads((out / "adapter_config.json").read_text())["lora_bias"] is True
    ours, theirs = _peft_logits(base, out), _tuned_logits(tuned)
    assert torch.allclose(ours, theirs, atol=1e-4), float((ours - theirs).abs().max())
