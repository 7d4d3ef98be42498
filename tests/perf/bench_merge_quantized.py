"""Benchmark: loratool merge into a block-fp8 base (dequantize, merge, requantize, tensor by tensor).

Input: a generated Llama-shaped checkpoint (hidden 2048, intermediate 8192, 32 / 8 heads, vocab
32000, untied; 16 layers is about 1.1B parameters) with every projection weight in
float8_e4m3fn plus a float32 `weight_scale_inv` per 128x128 tile (the Hugging Face fine-grained
fp8 layout, `quant_method: fp8` in config.json), embeddings and norms in bf16, in shards of at
most 1 GB; and a PEFT r16 adapter on q, k, v, o, gate, up, down. Random values: only sizes matter.

Contenders, each whole-process with `sync` after it: `cp -r BASE X`, `loratool merge` (fp8 kept,
scales recomputed), `loratool merge --dtype bf16` (a dequantized bf16 model). Peak RSS is each
child's ru_maxrss: it must stay bounded by the largest tensor (a few times 8192 x 2048 float32),
not by the model. Check: the merged checkpoint's headers mirror the base's.

Run: python tests/perf/bench_merge_quantized.py [--layers 16] [--workdir /tmp/bench_merge_fp8] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HIDDEN, INTER, HEADS, KV, VOCAB, BLOCK = 2048, 8192, 32, 8, 32000, 128


def make_base(root: Path, layers: int) -> int:
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    head = HIDDEN // HEADS
    shapes = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV * head, HIDDEN),
              "self_attn.v_proj": (KV * head, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
              "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER)}
    root.mkdir(parents=True)
    shard: dict[str, torch.Tensor] = {}
    written: list[tuple[Path, list[str]]] = []  # each shard is saved when full: memory stays at one shard
    size = total = params = 0

    def flush() -> None:
        path = root / f"part{len(written)}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        written.append((path, list(shard)))
        shard.clear()

    def add(key: str, t: torch.Tensor) -> None:
        nonlocal size, total
        if size + t.numel() * t.element_size() > 1 << 30 and shard:
            flush()
            size = 0
        shard[key] = t
        size += t.numel() * t.element_size()
        total += t.numel() * t.element_size()

    add("model.embed_tokens.weight", (torch.randn(VOCAB, HIDDEN) * 0.02).bfloat16())
    params += VOCAB * HIDDEN
    for layer in range(layers):
        for name, (out, inp) in shapes.items():
            w = torch.randn(out, inp) * 0.02
            amax = w.abs().reshape(out // BLOCK, BLOCK, inp // BLOCK, BLOCK).amax(dim=(1, 3))
            scale = 448.0 / amax
            q = (w.reshape(out // BLOCK, BLOCK, inp // BLOCK, BLOCK) * scale[:, None, :, None]).reshape(out, inp)
            add(f"model.layers.{layer}.{name}.weight", q.clamp(-448, 448).to(torch.float8_e4m3fn))
            add(f"model.layers.{layer}.{name}.weight_scale_inv", (1.0 / scale).float())
            params += out * inp
        for norm in ("input_layernorm", "post_attention_layernorm"):
            add(f"model.layers.{layer}.{norm}.weight", torch.ones(HIDDEN, dtype=torch.bfloat16))
    add("model.norm.weight", torch.ones(HIDDEN, dtype=torch.bfloat16))
    add("lm_head.weight", (torch.randn(VOCAB, HIDDEN) * 0.02).bfloat16())
    params += VOCAB * HIDDEN
    flush()
    weight_map = {}
    for i, (path, keys) in enumerate(written):
        name = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        path.rename(root / name)
        weight_map.update(dict.fromkeys(keys, name))
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": layers,
        "num_attention_heads": HEADS, "num_key_value_heads": KV, "vocab_size": VOCAB,
        "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                "weight_block_size": [BLOCK, BLOCK]}}))
    return params


def make_adapter(root: Path, layers: int, targets: tuple[str, ...] | None = None) -> None:
    """A PEFT r16 adapter on `targets` (module suffixes such as "self_attn.q_proj"; default all seven)."""
    import torch
    from safetensors.torch import save_file

    head = HIDDEN // HEADS
    shapes = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV * head, HIDDEN),
              "self_attn.v_proj": (KV * head, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
              "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER)}
    tensors = {}
    shapes = {n: s for n, s in shapes.items() if targets is None or n in targets}
    for layer in range(layers):
        for name, (out, inp) in shapes.items():
            stem = f"base_model.model.model.layers.{layer}.{name}"
            tensors[f"{stem}.lora_A.weight"] = torch.randn(16, inp) / inp**0.5
            tensors[f"{stem}.lora_B.weight"] = torch.randn(out, 16) * 0.01
    root.mkdir(parents=True)
    save_file(tensors, str(root / "adapter_model.safetensors"))
    (root / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 16, "lora_alpha": 32,
        "target_modules": [n.split(".")[-1] for n in shapes]}))


def rss_of(cmd: list[str]) -> tuple[float, float, str]:
    """Wall time (with sync), peak RSS in MB and stdout of a command run in a fresh wrapper."""
    wrapper = (
        "import resource, subprocess, sys, time; t=time.perf_counter(); "
        "r = subprocess.run(sys.argv[1:], check=True, capture_output=True, text=True); "
        "subprocess.run(['sync'], check=True); "
        "print(time.perf_counter()-t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
        "print(r.stdout, end='')"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], check=True, capture_output=True, text=True).stdout
    first, _, rest = out.partition("\n")
    wall, peak_kb = first.split()
    return float(wall), int(peak_kb) / 1024, rest


def bench_args(workdir: str) -> tuple[argparse.Namespace, Path]:
    """--layers, --workdir (emptied), --keep: the options of the quantized-merge benchmarks."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--workdir", default=workdir)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = Path(args.workdir)
    if work.exists():
        shutil.rmtree(work)
    return args, work


def run_rows(rows: dict[str, list[str]]) -> None:
    """Each contender once (rss_of), one line each; a merge's --json adds its summary."""
    for name, cmd in rows.items():
        wall, peak, out = rss_of(cmd)
        extra = ""
        if out.strip():
            doc = json.loads(out)
            extra = f" | {doc['merged_tensors']} merged"
            if doc.get("min_retained") is not None:
                extra += f", min retained {doc['min_retained']:.3f}, max rel. error {doc['max_rel_error']:.3g}"
            extra += f", output {doc['size'] / 1e9:.2f} GB"
        print(f"  {name}: {wall:.1f} s, peak RSS {peak:.0f} MB{extra}", flush=True)


def finish(args: argparse.Namespace, work: Path) -> None:
    """The machine's line, then the work directory removed unless --keep."""
    print(f"machine: {os.cpu_count()} cpus; load average {os.getloadavg()}")
    if not args.keep:
        shutil.rmtree(work)


def main() -> None:
    args, work = bench_args("/tmp/bench_merge_fp8")
    base, adapter = work / "base", work / "adapter"
    params = make_base(base, args.layers)
    make_adapter(adapter, args.layers)
    size = sum(f.stat().st_size for f in base.iterdir())
    shards = len(list(base.glob("*.safetensors")))
    subprocess.run(["sync"], check=True)
    lt = [sys.executable, "-m", "loratool", "merge", str(base), str(adapter)]
    rows = {
        "cp -r && sync": ["cp", "-r", str(base), str(work / "cp")],
        "loratool merge (fp8 kept)": [*lt, "-o", str(work / "fp8"), "--json"],
        "loratool merge --dtype bf16": [*lt, "-o", str(work / "bf16"), "--dtype", "bf16", "--json"],
    }
    print(f"{args.layers} layers, {params / 1e9:.2f}B params, {size / 1e9:.2f} GB in {shards} shards (block fp8)")
    run_rows(rows)
    from loratool.io.checkpoint import open_checkpoint

    a, b = open_checkpoint(base), open_checkpoint(work / "fp8")
    layout = [[(k, i.shape, i.dtype) for k, i in c.tensors.items()] for c in (a, b)]
    assert layout[0] == layout[1], "the merged checkpoint does not mirror the base"
    finish(args, work)


if __name__ == "__main__":
    main()
