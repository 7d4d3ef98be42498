"""loratool scan: hashes, layout rules, pickle imports read without running them, the content fingerprint."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
from pathlib import Path

import torch
from clirun import run_cli
from factories import build_adapter
from safetensors.torch import load_file, save_file

MODS = {"lora_unet_down_blocks_0_attentions_0_proj_in": (16, 16),
        "lora_te1_text_model_encoder_layers_0_self_attn_k_proj": (12, 12)}


def _scan(path, *extra):
    r = run_cli(["scan", path, "--json", *extra])
    return r.code, json.loads(r.out) if r.out else None


def test_hashes_are_the_ones_hubs_compute(tmp_path):
    p = build_adapter(tmp_path, fmt="kohya", modules=MODS, seed=1)
    raw = p.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    data_sha = hashlib.sha256(raw[8 + n:]).hexdigest()  # addnet_hash_safetensors: the bytes after the header
    code, doc = _scan(p)
    assert code == 0 and doc["ok"]
    f = doc["files"][0]
    assert f["sha256"] == hashlib.sha256(raw).hexdigest() and f["autov2"] == f["sha256"][:10].upper()
    assert f["tensor_sha256"] == data_sha and f["modelspec_hash_sha256"] == "0x" + data_sha
    assert f["autov3"] == data_sha[:12].upper()
    # a stored hash that disagrees with the data is reported
    t = load_file(p)
    save_file(t, tmp_path / "claimed.safetensors", metadata={"sshs_model_hash": "0" * 64})
    code, doc = _scan(tmp_path / "claimed.safetensors")
    assert any(x["code"] == "scan-stored-hash" for x in doc["findings"])


def test_fingerprint_is_one_across_dialects_dtypes_and_padding(tmp_path):
    p = build_adapter(tmp_path, fmt="kohya", modules=MODS, seed=2, alpha=4)
    fp = _scan(p)[1]["fingerprint"]
    for to in ("diffusers", "peft"):
        out = tmp_path / (f"c_{to}.safetensors" if to == "diffusers" else "c_peft")
        assert run_cli(["convert", p, "--to", to, "-o", out]).code == 0
        assert _scan(out)[1]["fingerprint"] == fp, to
    t = load_file(p)
    bf16 = {k: (v if k.endswith(".alpha") else v.to(torch.bfloat16)) for k, v in t.items()}
    save_file(bf16, tmp_path / "bf16.safetensors")
    save_file({k: (v if k.endswith(".alpha") else v.to(torch.bfloat16).to(torch.float32)) for k, v in t.items()},
              tmp_path / "bf16_as_fp32.safetensors")
    assert _scan(tmp_path / "bf16.safetensors")[1]["fingerprint"] == fp
    assert _scan(tmp_path / "bf16_as_fp32.safetensors")[1]["fingerprint"] == fp
    # rank padded with zeros, alpha scaled to keep the scale: the same delta, another factorisation
    padded = {}
    for k, v in t.items():
        if k.endswith("lora_down.weight"):
            padded[k] = torch.cat([v, torch.zeros_like(v)])
        elif k.endswith("lora_up.weight"):
            padded[k] = torch.cat([v, torch.zeros_like(v)], dim=1)
        else:
            padded[k] = v * 2  # alpha doubles with the rank: the same scale
    save_file(padded, tmp_path / "padded.safetensors")
    assert _scan(tmp_path / "padded.safetensors")[1]["fingerprint"] == fp
    # another delta: another fingerprint
    assert run_cli(["rescale", p, "-o", tmp_path / "half.safetensors", "--factor", "0.5"]).code == 0
    assert _scan(tmp_path / "half.safetensors")[1]["fingerprint"] != fp
    other = build_adapter(tmp_path, fmt="kohya", modules=MODS, seed=3, alpha=4, name="other.safetensors")
    assert _scan(other)[1]["fingerprint"] != fp


class _Touch:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_pickle_imports_are_read_never_run(tmp_path):
    marker = tmp_path / "ran"
    evil = tmp_path / "adapter_model.bin"
    evil.write_bytes(pickle.dumps({"w": _Touch(str(marker))}, protocol=4))
    code, doc = _scan(evil)
    assert code == 1 and not doc["ok"] and not marker.exists()
    imports = {(i["module"], i["name"]): i["allowed"] for i in doc["files"][0]["pickle_imports"]}
    assert imports and not any(imports.values()) and any(m == "pathlib" for m, _ in imports)
    assert any(x["code"] == "scan-pickle-import" for x in doc["findings"])
    # torch.save of a plain state dict names only what weights_only loading allows
    good = tmp_path / "good.bin"
    torch.save({"base_model.model.x.lora_A.weight": torch.zeros(2, 4)}, good)
    code, doc = _scan(good)
    assert code == 0 and all(i["allowed"] for i in doc["files"][0]["pickle_imports"])
    assert doc["files"][0]["pickle_opcodes"] > 0 and doc["fingerprint"] is None


def test_layout_rules_are_listed(tmp_path):
    p = build_adapter(tmp_path, fmt="kohya", modules=MODS, seed=4)
    bad = tmp_path / "trailing.safetensors"
    bad.write_bytes(p.read_bytes() + b"\0" * 16)
    code, doc = _scan(bad)
    assert code == 1 and any("trailing byte" in m for m in doc["files"][0]["layout_problems"])
    assert os.path.getsize(bad) == doc["files"][0]["size"]


def test_batch_scan_lines(tmp_path):
    (tmp_path / "in").mkdir()
    for i in range(3):
        build_adapter(tmp_path / "in", fmt="kohya", modules=MODS, seed=i, name=f"s{i}.safetensors")
    r = run_cli(["batch", "scan", tmp_path / "in"])
    lines = [json.loads(x) for x in r.out.splitlines()]
    assert r.code == 0 and len({x["result"]["fingerprint"] for x in lines[:-1]}) == 3
