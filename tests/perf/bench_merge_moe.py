"""Benchmark: loratool merge vs peft merge_and_unload + save_pretrained on a mixture-of-experts model.

Input: a random gpt-oss model (transformers' GptOssForCausalLM: hidden 1024, 64 experts of intermediate
512, 16 / 4 heads, vocab 32000; 10 layers is about 1.1B parameters) in bf16, its experts stored fused on
disk (`mlp.experts.gate_up_proj` (64, 1024, 1024), `mlp.experts.down_proj` (64, 512, 1024) per layer),
saved by transformers in shards of at most 1 GB (about 2.2 GB in all), and a peft adapter made by peft
itself with `target_parameters` on both fused expert parameters (r 16 per expert) plus q_proj / v_proj.
Each contender runs whole-process in a subprocess followed by `sync`; peak RSS is the child's
ru_maxrss. The outputs are compared tensor by tensor (peft adds its delta computed in bf16, loratool
in float32, so a few ulps may differ: the largest difference relative to the tensor's own scale is
reported).

Run: nice python tests/perf/bench_merge_moe.py [--layers 10] [--repeat 1] [--workdir /tmp/bench_merge_moe] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import bench_merge
from bench_merge import run_contenders, summary

# the dense benchmark's peft contender, on gpt-oss
PEFT_SCRIPT = bench_merge.PEFT_SCRIPT.replace("LlamaForCausalLM", "GptOssForCausalLM")

MAKE_SCRIPT = textwrap.dedent("""
    import sys, torch
    from transformers import GptOssConfig, GptOssForCausalLM
    from peft import LoraConfig, get_peft_model
    layers, experts, base, adapter = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.manual_seed(0)
    cfg = GptOssConfig(hidden_size=1024, intermediate_size=512, num_local_experts=experts, num_experts_per_tok=4,
                       num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
                       vocab_size=32000, layer_types=["full_attention"] * layers, tie_word_embeddings=False)
    with torch.device("cpu"):
        model = GptOssForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(base, max_shard_size="1GB")
    lora = LoraConfig(r=16, lora_alpha=32, init_lora_weights=False, target_modules=["q_proj", "v_proj"],
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    get_peft_model(model, lora).save_pretrained(adapter)
    print(sum(p.numel() for p in model.parameters()))
""")


def compare(a: Path, b: Path) -> tuple[int, int, float]:
    """(tensors compared, tensors not bit-identical, largest |a - b| / max|b| over all tensors)."""
    import torch
    from safetensors import safe_open

    from loratool.io.checkpoint import open_checkpoint

    ca, cb = open_checkpoint(a), open_checkpoint(b)
    compared = differing = 0
    worst = 0.0
    for key, info in ca.tensors.items():
        if key not in cb.tensors:
            continue
        with safe_open(str(info.path), "pt") as fa, safe_open(str(cb.tensors[key].path), "pt") as fb:
            x, y = fa.get_tensor(key), fb.get_tensor(key)
        compared += 1
        if not torch.equal(x, y):
            differing += 1
            scale = y.float().abs().max().item() or 1.0
            worst = max(worst, (x.float() - y.float()).abs().max().item() / scale)
    return compared, differing, worst


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--workdir", default="/tmp/bench_merge_moe")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    d = Path(args.workdir)
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    base, adapter = d / "base", d / "adapter"
    params = int(subprocess.run([sys.executable, "-c", MAKE_SCRIPT, str(args.layers), str(args.experts), str(base),
                                 str(adapter)], check=True, capture_output=True, text=True).stdout.split()[-1])
    size, shards, runs = run_contenders(d, base, adapter, PEFT_SCRIPT, args.repeat)
    t_cp, t_ours, t_peft, rss_ours, rss_peft = summary(runs)
    compared, differing, worst = compare(d / "ours", d / "peft")
    print(f"gpt-oss, {args.layers} layers x {args.experts} experts, {params / 1e9:.2f}B params, {size / 1e9:.2f} GB "
          f"in {shards} shards: cp+sync {t_cp:.1f} s | loratool {t_ours:.1f} s, peak {rss_ours:.0f} MB | "
          f"peft {t_peft:.1f} s, peak {rss_peft:.0f} MB ({t_peft / t_ours:.1f}x slower) | {compared} tensors, "
          f"{differing} not bit-identical, largest difference {worst:.2e} of the tensor's scale", flush=True)
    print(f"machine: {os.cpu_count()} cpus; load average {os.getloadavg()}")
    if not args.keep:
        shutil.rmtree(d)


if __name__ == "__main__":
    main()
