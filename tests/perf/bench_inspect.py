"""Benchmark: `loratool inspect --json` on a ~1 GB adapter (DESIGN.md 8: well under a second, no torch).

Input: a synthetic PEFT adapter with Llama-2-7B dimensions (hidden 4096, intermediate 11008; q,k,v,o,
gate,up,down at rank 128, fp16), as many layers as make up --size-gb (1 GB: 51 layers, 357 modules).
It is written with loratool.io.writers.StreamingWriter one tensor at a time, so building it needs memory
for one tensor only.

Measured: the whole process (`python -m loratool inspect DIR --json`: interpreter start, imports,
header parse, JSON out), best of --repeat runs. A second run under `python -c` reports whether torch
was imported and how many bytes the process read (/proc/self/io rchar: Python's own module files
included), to show that the tensor data is never read.

Run: python tests/perf/bench_inspect.py [--size-gb 1.0] [--repeat 3] [--format peft|kohya] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

HIDDEN, INTER = 4096, 11008
TARGETS = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTER, HIDDEN),
    "mlp.up_proj": (INTER, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTER),
}


def layer_bytes(rank: int) -> int:
    return sum((rank * inp + out * rank) * 2 for out, inp in TARGETS.values())  # fp16


def build(root: Path, fmt: str, size_gb: float, rank: int) -> tuple[Path, int, int]:
    """Write the adapter; returns (path to inspect, number of modules, bytes of tensor data)."""
    import torch

    from loratool.io.writers import StreamingWriter

    layers = max(1, math.ceil(size_gb * 1e9 / layer_bytes(rank)))
    entries: list[tuple[str, str, tuple[int, ...]]] = []
    for i in range(layers):
        for target, (out, inp) in TARGETS.items():
            if fmt == "peft":
                stem = f"base_model.model.model.layers.{i}.{target}"
                down, up = stem + ".lora_A.weight", stem + ".lora_B.weight"
            else:
                stem = f"lora_te_model_layers_{i}_{target.replace('.', '_')}"
                down, up = stem + ".lora_down.weight", stem + ".lora_up.weight"
                entries.append((stem + ".alpha", "float32", ()))
            entries += [(down, "float16", (rank, inp)), (up, "float16", (out, rank))]
    if fmt == "peft":
        path = root / "adapter"
        path.mkdir()
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": sorted(
            t.split(".")[-1] for t in TARGETS), "base_model_name_or_path": "meta-llama/Llama-2-7b-hf"}
        (path / "adapter_config.json").write_text(json.dumps(config))
        file = path / "adapter_model.safetensors"
    else:
        path = file = root / "adapter.safetensors"
    gen = torch.Generator().manual_seed(0)
    writer = StreamingWriter(file, entries, {"format": "pt"})
    try:
        for key, _, shape in entries:
            if not shape:
                writer.write(key, torch.tensor(float(2 * rank)))
            else:
                writer.write(key, (torch.randn(shape, generator=gen) * 0.01).half())
    except BaseException:
        writer.abort()
        raise
    writer.close()
    data = sum(math.prod(s) * (2 if s else 4) for _, _, s in entries)
    return path, layers * len(TARGETS), data


_PROBE = textwrap.dedent("""
    import sys
    from loratool.cli import main
    try:
        main(["inspect", sys.argv[1], "--json"])
    except SystemExit as e:
        code = e.code
    rchar = next(int(line.split()[1]) for line in open("/proc/self/io") if line.startswith("rchar"))
    sys.stderr.write(f"PROBE exit={code} torch={'torch' in sys.modules} rchar={rchar}\\n")
""")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--format", choices=["peft", "kohya"], default="peft")
    ap.add_argument("--keep", type=Path, help="build into this (new) directory and keep it")
    args = ap.parse_args()

    tmp = None
    if args.keep:
        args.keep.mkdir(parents=True)
        root = args.keep
    else:
        tmp = tempfile.TemporaryDirectory(prefix="bench-inspect-")
        root = Path(tmp.name)
    try:
        t0 = time.perf_counter()
        path, modules, data = build(root, args.format, args.size_gb, args.rank)
        print(f"built {path} ({args.format}, {modules} modules, rank {args.rank}, fp16, "
              f"{data / 1e9:.2f} GB of tensor data) in {time.perf_counter() - t0:.1f} s")

        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "loratool", "inspect", str(path), "--json"],
                               capture_output=True, text=True)
            times.append(time.perf_counter() - t)
            if p.returncode != 0:
                sys.exit(f"inspect failed ({p.returncode}): {p.stderr}")
        doc = json.loads(p.stdout)
        assert doc["num_modules"] == modules, doc["num_modules"]

        probe = subprocess.run([sys.executable, "-c", _PROBE, str(path)], capture_output=True, text=True)
        line = next(ln for ln in probe.stderr.splitlines() if ln.startswith("PROBE"))
        fields = dict(kv.split("=") for kv in line.split()[1:])
        print(f"inspect --json: best {min(times):.3f} s of {args.repeat} "
              f"(runs: {', '.join(f'{t:.3f}' for t in times)})")
        print(f"torch imported: {fields['torch'] == 'True'}; bytes read by the process: "
              f"{int(fields['rchar']) / 1e6:.1f} MB (tensor data: {data / 1e6:.0f} MB)")
        bare = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], check=True)
            bare.append(time.perf_counter() - t)
        print(f"(a bare `python -c pass` on this machine: best {min(bare):.3f} s)")
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
