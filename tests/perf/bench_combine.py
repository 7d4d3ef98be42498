"""Benchmark: loratool combine --method svd vs peft add_weighted_adapter(combination_type="svd").

Same model, same adapters, same run. Setup (not timed): a random LlamaForCausalLM with Llama-3.2-1B
dimensions (hidden 2048, intermediate 8192, 32 / 8 heads, 16 layers, vocab 128256, tied
embeddings; bf16) built from a config (no download) and saved with save_pretrained; peft then
makes two r16 adapters (lora_alpha 32, init_lora_weights=False so B is random) on all 7 targets
(q, k, v, o, gate, up, down) and saves them as peft does (float32 factors).

Timed, each whole-process in its own subprocess (interpreter start, imports, reading, maths,
writing), weights 0.5 / 0.5, result rank 16:
- loratool: `python -m loratool combine A B -o OUT --weights 0.5,0.5 --method svd --rank 16 --device cpu -q`
- peft: a script that does what a peft user must: AutoModelForCausalLM.from_pretrained(base),
  PeftModel.from_pretrained(A), load_adapter(B), add_weighted_adapter(["one", "two"], [0.5, 0.5],
  combination_type="svd", svd_rank=16) with peft's defaults (dense ΔW per module, full_matrices=True
  SVD), save_pretrained. peft needs the base model in memory; that is part of its cost.
Peak RSS of each: the child's ru_maxrss, read by a one-child parent (RUSAGE_CHILDREN).
Check: per module, ||B@A (loratool) − B@A (peft)||_F / ||B@A (peft)||_F, computed in low-rank form;
for the worst module, both against a float64 dense SVD of the exact sum (the difference is peft's
float32 rounding where σ_16 ≈ σ_17 makes the rank-16 subspace ill-conditioned).

Run: python tests/perf/bench_combine.py [--layers 16] [--keep DIR] [--loratool-only [--repeat N]]
(--loratool-only: time loratool's runs only; with --code DIR, those of the checkout DIR: two versions back to back.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

BUILD = textwrap.dedent("""
    import sys, torch, transformers, warnings
    from peft import LoraConfig, get_peft_model
    root, layers = sys.argv[1], int(sys.argv[2])
    cfg = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=True,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    model = transformers.LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(root + "/base")
    lora = dict(r=16, lora_alpha=32, target_modules=TARGETS_REPR, init_lora_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(**lora), adapter_name="one")
    torch.manual_seed(2)
    peft_model.add_adapter("two", LoraConfig(**lora))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(root + "/adapters", selected_adapters=["one", "two"])
""").replace("TARGETS_REPR", repr(TARGETS))

PEFT = textwrap.dedent("""
    import sys, time, torch, transformers, warnings
    from peft import PeftModel
    base, a, b, out = sys.argv[1:5]
    warnings.simplefilter("ignore")
    model = transformers.AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.bfloat16)
    # adapter names: peft warns that a name inside "lora_" (such as "a") may be re-initialised on load
    model = PeftModel.from_pretrained(model, a, adapter_name="one")
    model.load_adapter(b, adapter_name="two")
    t0 = time.perf_counter()
    model.add_weighted_adapter(["one", "two"], [0.5, 0.5], "mix", combination_type="svd", svd_rank=16)
    t1 = time.perf_counter()
    model.save_pretrained(out, selected_adapters=["mix"])
    print(f"add_weighted_adapter {t1 - t0:.2f} s", file=sys.stderr)
""")

# a parent with exactly one child: RUSAGE_CHILDREN is that child's peak RSS (KiB on Linux)
MEASURE = textwrap.dedent("""
    import resource, subprocess, sys, time
    t0 = time.perf_counter()
    subprocess.run(sys.argv[1:], check=True)
    wall = time.perf_counter() - t0
    print(wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
""")


def measure(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one whole-process command."""
    res = subprocess.run([sys.executable, "-c", MEASURE, *cmd], check=True, stdout=subprocess.PIPE, text=True, env=env)
    wall, kib = res.stdout.split()[-2:]
    return float(wall), int(kib) * 1024 / 1e6


def compare(ours: Path, theirs: Path, inputs: list[Path]) -> tuple[int, float, str]:
    """(modules, worst relative difference of B @ A, a float64 check of the worst module).

    Both outputs have scale 1. The differences come from peft's float32 dense SVD: where σ_16 and
    σ_17 of the sum are close, the kept subspace is ill-conditioned, so for the worst module both
    results are also compared with a float64 dense SVD of the exact weighted sum.
    """
    import torch
    from safetensors.torch import load_file

    from loratool.maths.compare import product_fro_norm

    a = load_file(str(ours / "adapter_model.safetensors"))
    b = load_file(str(theirs / "adapter_model.safetensors"))
    for path in (ours, theirs):
        cfg = json.loads((path / "adapter_config.json").read_text())
        assert cfg["lora_alpha"] == cfg["r"] == 16 and not cfg.get("use_rslora"), cfg
        assert not cfg.get("rank_pattern") and not cfg.get("alpha_pattern"), cfg
    keys = sorted(k for k in b if k.endswith("lora_A.weight"))
    assert sorted(k for k in a if k.endswith("lora_A.weight")) == keys
    worst, worst_key = 0.0, keys[0]
    for ka in keys:
        kb = ka.replace("lora_A", "lora_B")
        up = torch.cat([a[kb].double(), -b[kb].double()], dim=1)
        down = torch.cat([a[ka].double(), b[ka].double()], dim=0)
        diff = product_fro_norm(up, down) / product_fro_norm(b[kb], b[ka])
        if diff > worst:
            worst, worst_key = diff, ka

    # float64 reference for the worst module: the exact sum 0.5·s·B1A1 + 0.5·s·B2A2, dense SVD
    exact = 0
    for path in inputs:
        cfg = json.loads((path / "adapter_config.json").read_text())
        sd = load_file(str(path / "adapter_model.safetensors"))
        exact = exact + 0.5 * cfg["lora_alpha"] / cfg["r"] * (
            sd[worst_key.replace("lora_A", "lora_B")].double() @ sd[worst_key].double())
    u, sig, vh = torch.linalg.svd(exact, full_matrices=False)
    ref = (u[:, :16] * sig[:16]) @ vh[:16]
    dist = {}
    for label, sd in (("loratool", a), ("peft", b)):
        got = sd[worst_key.replace("lora_A", "lora_B")].double() @ sd[worst_key].double()
        dist[label] = float(torch.linalg.norm(got - ref) / torch.linalg.norm(ref))
    module = worst_key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
    note = (f"worst module {module}: σ16/σ17 = {float(sig[15] / sig[16]):.4f}; relative distance to a float64 "
            f"best rank-16 approximation: loratool {dist['loratool']:.1e}, peft {dist['peft']:.1e}")
    return len(keys), worst, note


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--keep", type=Path, default=None, help="build into this directory and keep it")
    ap.add_argument("--loratool-only", action="store_true", help="skip peft (and the check)")
    ap.add_argument("--repeat", type=int, default=1, help="with --loratool-only: runs of loratool")
    ap.add_argument("--code", type=Path, default=None, help="with --loratool-only: run the loratool of this checkout")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_combine_"))
    try:
        if not (root / "adapters" / "two").exists():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", BUILD, str(root), str(args.layers)], check=True)
            print(f"setup (model + 2 peft adapters, not timed): {time.perf_counter() - t0:.1f} s")
        a, b = root / "adapters" / "one", root / "adapters" / "two"
        size = sum(f.stat().st_size for f in (a, b) for f in f.glob("*.safetensors"))
        print(f"inputs: 2 x ({args.layers} layers x 7 targets, r16 fp32), {size / 1e6:.1f} MB; cpus {os.cpu_count()}, "
              f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        for out in ("ours", "peft"):
            shutil.rmtree(root / out, ignore_errors=True)
        ours_cmd = [sys.executable, "-m", "loratool", "combine", str(a), str(b), "-o", str(root / "ours"),
                    "--weights", "0.5,0.5", "--method", "svd", "--rank", "16", "--device", "cpu", "-q"]
        for _ in range(args.repeat if args.loratool_only else 1):
            shutil.rmtree(root / "ours", ignore_errors=True)
            t_ours, m_ours = measure(ours_cmd, {**os.environ, "PYTHONPATH": str(args.code)} if args.code else None)
            print(f"loratool combine svd : {t_ours:8.2f} s  peak RSS {m_ours:8.0f} MB")
        if args.loratool_only:
            return
        t_peft, m_peft = measure([sys.executable, "-c", PEFT, str(root / "base"), str(a), str(b), str(root / "peft")])
        print(f"peft svd (whole)     : {t_peft:8.2f} s  peak RSS {m_peft:8.0f} MB")
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        n, worst, note = compare(root / "ours", root / "peft" / "mix", [a, b])
        print(f"speed-up {t_peft / t_ours:.1f}x, memory {m_peft / m_ours:.1f}x less; {n} modules, "
              f"max relative difference of B@A {worst:.2e}; load average after {load}")
        print(note)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
