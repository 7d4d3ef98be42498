"""One prepared device check (issue 16): timings and equality checks of every device-sensitive command.

Generates a Llama-layout bf16 checkpoint (default 3.5B parameters: hidden 4096, intermediate 11008,
16 layers, vocab 32000; about 7 GB in 4 shards) and PEFT adapters with random factors, written
directly with safetensors (no model is instantiated), then times, each whole-process and followed by
`sync`:

- `cp -r base X && sync` (the I/O floor),
- `loratool merge` on every device asked for (default: cuda when available, and cpu),
- peft `from_pretrained(device_map=...)` + `merge_and_unload` + `save_pretrained` (unless --skip-peft),
- `resize --rank 16` of an r64 adapter (196 modules: 28 layers x 7 targets), `combine --method svd
  --rank 32` of two r16 adapters, and `extract --rank 16` from the base and a merged model, per device,

compares the outputs (merge: bitwise between devices and against peft; resize/combine/extract: each
module's delta within 1e-5 relative between devices), runs the test suite with this machine's devices
present (unless --skip-suite), and prints one table plus every failure with its error. Each merge
runs with LORATOOL_TIMINGS=1, so its per-stage timings (read / compute / write / hash) are printed.

Run on the GPU machine (about 6 minutes):   bash tests/perf/device_check.sh
Tested on CPU with a small model:           python tests/perf/device_check.py --small --devices cpu
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

PEFT_SCRIPT = textwrap.dedent("""
    import sys, torch
    from transformers import LlamaForCausalLM
    from peft import PeftModel
    base, adapter, out, device = sys.argv[1:5]
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map=device)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(out, max_shard_size="2GB")
""")


def dims(hidden: int, inter: int, heads: int, kv_heads: int) -> dict[str, tuple[int, int]]:
    """(out, in) of each adapted projection of one Llama layer."""
    head_dim = hidden // heads
    return {
        "q_proj": (hidden, hidden), "k_proj": (kv_heads * head_dim, hidden), "v_proj": (kv_heads * head_dim, hidden),
        "o_proj": (hidden, hidden), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }


def make_base(path: Path, *, hidden: int, inter: int, layers: int, vocab: int, heads: int, kv_heads: int,
              shards: int, device: str) -> int:
    """A random bf16 Llama checkpoint in `shards` files with its index and config; returns the parameter count."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    gen = torch.Generator(device=device).manual_seed(0)
    names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        for t, (o, n) in dims(hidden, inter, heads, kv_heads).items():
            part = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            names.append((f"{p}.{part}.{t}.weight", (o, n)))
        names += [(f"{p}.input_layernorm.weight", (hidden,)), (f"{p}.post_attention_layernorm.weight", (hidden,))]
    names += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    total = sum(int(torch.Size(s).numel()) for _, s in names)
    per = total / shards
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    acc = 0
    for name, shape in names:
        n = int(torch.Size(shape).numel())
        if acc + n > per * len(groups) and groups[-1] and len(groups) < shards:
            groups.append([])
        groups[-1].append((name, shape))
        acc += n
    weight_map = {}
    for k, group in enumerate(groups, 1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(0.02)
            tensors[name] = t.to(torch.bfloat16).cpu()
            weight_map[name] = fname
        save_file(tensors, str(path / fname), metadata={"format": "pt"})
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total * 2}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "vocab_size": vocab, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "max_position_embeddings": 4096,
    }, indent=2))
    return total


def make_adapter(path: Path, *, hidden: int, inter: int, layers: int, heads: int, kv_heads: int, rank: int,
                 seed: int) -> None:
    """A PEFT adapter with random (non-zero) factors on the seven Llama targets, alpha = 2·rank."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for t, (o, n) in dims(hidden, inter, heads, kv_heads).items():
            part = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{i}.{part}.{t}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, n, generator=gen) / n ** 0.5).to(torch.bfloat16)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(o, rank, generator=gen) * 0.01).to(torch.bfloat16)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": list(TARGETS), "base_model_name_or_path": None, "lora_dropout": 0.0, "bias": "none",
    }, indent=2))


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """(wall seconds including sync, peak RSS MB of the child, stderr) of one whole-process run."""
    wrapper = (
        "import resource, subprocess, sys, time; t=time.perf_counter(); "
        "p=subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True); "
        "subprocess.run(['sync']); sys.stderr.write(p.stderr); "
        "print(time.perf_counter()-t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, p.returncode)"
    )
    p = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    if p.returncode != 0 or not p.stdout.strip():
        raise RuntimeError(f"{' '.join(cmd)}: wrapper failed: {p.stderr[-3000:]}")
    wall, peak, rc = p.stdout.split()
    if int(rc) != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {rc}:\n{p.stderr[-3000:]}")
    return float(wall), int(peak) / 1024, p.stderr


def loratool(*args: str) -> list[str]:
    return [sys.executable, "-m", "loratool", *args, "-q"]


def differing_tensors(a: Path, b: Path) -> tuple[int, int]:
    """(tensors that differ bitwise, tensors compared) between two checkpoints, by key."""
    import torch
    from safetensors import safe_open

    from loratool.io.checkpoint import open_checkpoint

    ca, cb = open_checkpoint(a), open_checkpoint(b)
    differ = compared = 0
    for key, info in ca.tensors.items():
        if key not in cb.tensors:
            continue
        with safe_open(str(info.path), "pt") as fa, safe_open(str(cb.tensors[key].path), "pt") as fb:
            differ += not torch.equal(fa.get_tensor(key), fb.get_tensor(key))
        compared += 1
    return differ, compared


def worst_delta_difference(a: Path, b: Path) -> float:
    """Largest relative Frobenius difference between the two adapters' per-module deltas (low-rank route)."""
    from loratool.formats import read
    from loratool.maths.delta import factors

    ra, rb = read(a), read(b)
    worst = 0.0
    for name, m in ra.modules.items():
        n = rb.modules[name]
        ua, da = factors(m)
        ub, db = factors(n)
        ua, ub = ua * m.scale, ub * n.scale
        # ||UaDa − UbDb||² = ||UaDa||² + ||UbDb||² − 2<UaDa, UbDb>, each through r×r products
        def inner(u1, d1, u2, d2):  # type: ignore[no-untyped-def]
            return float(((u1.T @ u2) * (d1 @ d2.T)).sum())
        aa, bb, ab = inner(ua, da, ua, da), inner(ub, db, ub, db), inner(ua, da, ub, db)
        worst = max(worst, max(aa + bb - 2 * ab, 0.0) ** 0.5 / max(aa ** 0.5, 1e-30))
    return worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/device_check")
    ap.add_argument("--devices", default=None, help="comma-separated (default: cuda,cpu when CUDA is available)")
    ap.add_argument("--small", action="store_true", help="a tiny model (CPU test of this script)")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--skip-suite", action="store_true")
    ap.add_argument("--suite-args", default="-q -x -p no:cacheprovider -m 'not slow'",
                    help="pytest arguments for the suite run with the devices present")
    args = ap.parse_args()

    import torch

    sys.path.insert(0, str(ROOT))
    cuda = torch.cuda.is_available()
    devices = args.devices.split(",") if args.devices else (["cuda", "cpu"] if cuda else ["cpu"])
    gen_device = "cuda" if cuda else "cpu"
    if args.small:
        shape = dict(hidden=256, inter=688, layers=4, heads=8, kv_heads=4)
        vocab, shards, adapter_layers = 1000, 2, 4
    else:
        shape = dict(hidden=4096, inter=11008, layers=16, heads=32, kv_heads=32)
        vocab, shards, adapter_layers = 32000, 4, 28
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"device check: torch {torch.__version__}, cuda {'yes: ' + torch.cuda.get_device_name(0) if cuda else 'no'},"
          f" {os.cpu_count()} cpus, devices {devices}", flush=True)

    rows: list[tuple[str, str]] = []
    failures: list[str] = []
    t0 = time.perf_counter()
    params = make_base(work / "base", vocab=vocab, shards=shards, device=gen_device, **shape)
    make_adapter(work / "r16", rank=16, seed=1, **shape)
    big = dict(shape, layers=adapter_layers)
    make_adapter(work / "r64", rank=64, seed=2, **big)
    make_adapter(work / "r16b", rank=16, seed=3, **big)
    make_adapter(work / "r16c", rank=16, seed=4, **big)
    subprocess.run(["sync"], check=True)
    size = sum(f.stat().st_size for f in (work / "base").iterdir())
    rows.append(("generated", f"{params / 1e9:.2f}B params, {size / 1e9:.2f} GB in {shards} shards, "
                              f"{time.perf_counter() - t0:.1f} s"))

    def stage(label: str, cmd: list[str], env: dict[str, str] | None = None) -> float | None:
        try:
            wall, peak, err = timed(cmd, env)
        except Exception as e:
            failures.append(f"{label}: {e}")
            rows.append((label, "FAILED"))
            return None
        timings = [line for line in err.splitlines() if line.startswith("timings:")]
        rows.append((label, f"{wall:.2f} s, peak RSS {peak:.0f} MB" + (f"  [{timings[-1]}]" if timings else "")))
        return wall

    t_cp = stage("cp -r base && sync", ["cp", "-r", str(work / "base"), str(work / "cp")])
    shutil.rmtree(work / "cp", ignore_errors=True)
    merged: dict[str, Path] = {}
    t_merge: dict[str, float | None] = {}
    for dev in devices:
        out = work / f"merged_{dev}"
        t_merge[dev] = stage(f"merge --device {dev}", loratool("merge", str(work / "base"), str(work / "r16"),
                                                               "-o", str(out), "--device", dev),
                             env={"LORATOOL_TIMINGS": "1"})
        if out.exists():
            merged[dev] = out
    t_peft = None
    if not args.skip_peft:
        t_peft = stage(f"peft merge_and_unload ({gen_device})",
                       [sys.executable, "-c", PEFT_SCRIPT, str(work / "base"), str(work / "r16"), str(work / "peft"),
                        gen_device])
    for dev, out in merged.items():
        if (work / "peft").exists():
            d, n = differing_tensors(out, work / "peft")
            rows.append((f"merge {dev} vs peft", f"{d} of {n} tensors differ"))
            if d:
                failures.append(f"merge --device {dev}: {d} tensors differ from peft")
    if len(merged) > 1:
        a, b = list(merged.values())[:2]
        d, n = differing_tensors(a, b)
        rows.append(("merge cuda vs cpu", f"{d} of {n} tensors differ"))
        if d:
            failures.append(f"merge outputs differ between devices: {d} tensors")

    for op, make in (
        ("resize r64->16", lambda dev, o: loratool("resize", str(work / "r64"), "--rank", "16", "-o", o,
                                                  "--device", dev)),
        ("combine svd r32", lambda dev, o: loratool("combine", str(work / "r16b"), str(work / "r16c"),
                                                   "--weights", "0.7,0.3", "--method", "svd", "--rank", "32",
                                                   "-o", o, "--device", dev)),
        ("extract r16", lambda dev, o: loratool("extract", str(work / "base"), str(next(iter(merged.values()),
                                                                                         work / "base")),
                                               "--rank", "16", "-o", o, "--device", dev)),
    ):
        outs = []
        for dev in devices:
            o = work / f"{op.split()[0]}_{dev}"
            stage(f"{op} --device {dev}", make(dev, str(o)))
            if o.exists():
                outs.append(o)
        if len(outs) > 1:
            try:
                worst = worst_delta_difference(outs[0], outs[1])
                rows.append((f"{op} devices agree", f"worst relative delta difference {worst:.2e}"))
                if worst > 1e-5:
                    failures.append(f"{op}: devices differ by {worst:.2e} (> 1e-5)")
            except Exception as e:
                failures.append(f"{op}: comparing outputs failed: {e}")

    if not args.skip_suite:
        t = time.perf_counter()
        p = subprocess.run(f"{sys.executable} -m pytest {args.suite_args}", shell=True, cwd=ROOT,
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        tail = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else "(no output)"
        rows.append(("test suite", f"{tail} ({time.perf_counter() - t:.0f} s)"))
        if p.returncode != 0:
            failures.append("test suite failed:\n" + "\n".join(
                line for line in p.stdout.splitlines() if line.startswith(("FAILED", "ERROR", "E ")))[-6000:])

    print("\n| stage | result |\n|---|---|")
    for label, value in rows:
        print(f"| {label} | {value} |")
    if t_cp:
        for dev, t in t_merge.items():
            if t:
                print(f"merge --device {dev}: {t / t_cp:.2f}x cp" + (f", {t_peft / t:.2f}x faster than peft"
                                                                     if t_peft else ""))
    print(f"\n{len(failures)} failure(s)")
    for f in failures:
        print(f"- {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
