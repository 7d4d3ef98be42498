"""Benchmark: loratool merge vs `cp -r && sync` vs peft merge_and_unload + save_pretrained.

Input: a random Llama (hidden 2048, intermediate 8192, 32 / 8 heads, vocab 32000; 16 layers is
about 1.1B parameters) in bf16, saved by transformers in shards of at most 1 GB, and a peft r16
adapter on q,k,v,o,gate,up,down. Each contender runs whole-process in a subprocess, followed by
`sync`; peak RSS is the child's ru_maxrss. The outputs of loratool and peft are compared tensor by
tensor (bit-identical expected: both add the fp32 delta once into bf16).

Each contender runs --repeat times (default 3), alternating, its output removed and `sync` run
between runs; the table reports the median wall time and the largest peak RSS. loratool's bytecode
is compiled first (compileall), as an installed package's is and as peft's and transformers' are: an
editable checkout run with PYTHONDONTWRITEBYTECODE=1 (this machine sets it) would otherwise compile
loratool's sources again in every run, about 0.5 s.

Run: python tests/perf/bench_merge.py [--layers 16 8] [--repeat 3] [--workdir /tmp/bench_merge] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

PEFT_SCRIPT = textwrap.dedent("""
    import sys, torch
    from transformers import LlamaForCausalLM
    from peft import PeftModel
    base, adapter, out = sys.argv[1:4]
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(out, max_shard_size="1GB")
""")

MAKE_SCRIPT = textwrap.dedent("""
    import sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from peft import LoraConfig, get_peft_model
    layers, base, adapter = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(base, max_shard_size="1GB")
    lora = LoraConfig(r=16, lora_alpha=32, init_lora_weights=False,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    get_peft_model(model, lora).save_pretrained(adapter)
    print(sum(p.numel() for p in model.parameters()))
""")


def rss_of(cmd: list[str]) -> tuple[float, float]:
    """Run in a fresh wrapper so ru_maxrss is this command's own peak."""
    wrapper = (
        "import resource, subprocess, sys, time; t=time.perf_counter(); "
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); subprocess.run(['sync'], check=True); "
        "print(time.perf_counter()-t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], check=True, capture_output=True, text=True).stdout
    wall, peak_kb = out.split()
    return float(wall), int(peak_kb) / 1024


def compare(a: Path, b: Path) -> int:
    """How many tensors present in both checkpoints differ (bitwise)."""
    import torch
    from safetensors import safe_open

    from loratool.io.checkpoint import open_checkpoint

    ca, cb = open_checkpoint(a), open_checkpoint(b)
    differing = 0
    for key, info in ca.tensors.items():
        if key not in cb.tensors:
            continue
        with safe_open(str(info.path), "pt") as fa, safe_open(str(cb.tensors[key].path), "pt") as fb:
            differing += not torch.equal(fa.get_tensor(key), fb.get_tensor(key))
    return differing


def run_contenders(d: Path, base: Path, adapter: Path, peft_script: str, repeat: int
                   ) -> tuple[int, int, dict[str, list[tuple[float, float]]]]:
    """`cp -r`, loratool merge and `peft_script`, each `repeat` times, alternating: the base's size in bytes,
    its shard count, and (wall s, peak MB) per run. Outputs go to d/cp, d/ours, d/peft; the last run's are
    kept for comparison."""
    import loratool

    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(loratool.__file__).parent)], check=True,
                   stdout=subprocess.DEVNULL)
    size = sum(f.stat().st_size for f in base.iterdir())
    shards = len(list(base.glob("*.safetensors")))
    subprocess.run(["sync"], check=True)
    runs: dict[str, list[tuple[float, float]]] = {"cp": [], "ours": [], "peft": []}
    commands = {
        "cp": ["cp", "-r", str(base), str(d / "cp")],
        "ours": [sys.executable, "-m", "loratool", "merge", str(base), str(adapter), "-o", str(d / "ours"), "-q"],
        "peft": [sys.executable, "-c", peft_script, str(base), str(adapter), str(d / "peft")],
    }
    for i in range(repeat):
        for name, cmd in commands.items():
            if i:  # keep the last run's outputs for the comparison
                shutil.rmtree(d / name, ignore_errors=True)
                subprocess.run(["sync"], check=True)
            runs[name].append(rss_of(cmd))
    return size, shards, runs


def summary(runs: dict[str, list[tuple[float, float]]]) -> tuple[float, float, float, float, float]:
    """Median wall time of cp, loratool and peft, and the largest peak RSS of loratool and peft."""
    t_cp, t_ours, t_peft = (statistics.median(w for w, _ in runs[n]) for n in ("cp", "ours", "peft"))
    rss_ours, rss_peft = (max(r for _, r in runs[n]) for n in ("ours", "peft"))
    return t_cp, t_ours, t_peft, rss_ours, rss_peft


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[16, 8])
    ap.add_argument("--workdir", default="/tmp/bench_merge")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    work = Path(args.workdir)
    rows = []
    for layers in args.layers:
        d = work / f"L{layers}"
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        base, adapter = d / "base", d / "adapter"
        params = int(subprocess.run([sys.executable, "-c", MAKE_SCRIPT, str(layers), str(base), str(adapter)],
                                    check=True, capture_output=True, text=True).stdout.split()[-1])
        size, shards, runs = run_contenders(d, base, adapter, PEFT_SCRIPT, args.repeat)
        t_cp, t_ours, t_peft, rss_ours, rss_peft = summary(runs)
        spread = {n: " ".join(f"{w:.1f}" for w, _ in runs[n]) for n in runs}
        differing = compare(d / "ours", d / "peft")
        rows.append((layers, params, size, shards, t_cp, t_ours, rss_ours, t_peft, rss_peft, differing))
        print(f"{layers:2d} layers, {params / 1e9:.2f}B params, {size / 1e9:.2f} GB in {shards} shards: "
              f"cp+sync {t_cp:.1f} s | loratool {t_ours:.1f} s ({t_ours / t_cp:.2f}x cp), peak {rss_ours:.0f} MB | "
              f"peft {t_peft:.1f} s, peak {rss_peft:.0f} MB ({t_peft / t_ours:.1f}x slower) | "
              f"tensors differing from peft: {differing}\n    runs (s): cp {spread['cp']} | "
              f"loratool {spread['ours']} | peft {spread['peft']}", flush=True)
        if not args.keep:
            shutil.rmtree(d)
    print(f"machine: {os.cpu_count()} cpus; load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
