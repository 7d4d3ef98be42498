"""Benchmark: loratool diff of two 400-module adapters (Llama-1B-like shapes, r16, bf16).

Two PEFT adapters with 400 modules each (57 layers × q,k,v,o,gate,up,down + one more, hidden 2048,
intermediate 8192, rank 16, independent random factors) are written with safetensors. Reported: the
in-process time of `loratool.ops.diff.diff` (reading the headers and factors, the Gram matrices of
every module), the wall time of the `loratool diff A B --json` command, and of `loratool --version`
(the start-up it includes). The result is checked against dense numpy on three modules.

Run: python tests/perf/bench_diff.py [--workdir /tmp/bench_diff] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HIDDEN, INTER, RANK = 2048, 8192, 16
SHAPES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (512, HIDDEN), "v_proj": (512, HIDDEN), "o_proj": (HIDDEN, HIDDEN),
          "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN), "down_proj": (HIDDEN, INTER)}


def names() -> list[tuple[str, tuple[int, int]]]:
    out = []
    layer = 0
    while len(out) < 400:
        for proj, shape in SHAPES.items():
            kind = "self_attn" if proj.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            out.append((f"model.layers.{layer}.{kind}.{proj}", shape))
            if len(out) == 400:
                break
        layer += 1
    return out


def write_adapter(path: Path, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out_f, in_f) in names():
        tensors[f"base_model.model.{name}.lora_A.weight"] = (torch.randn(RANK, in_f, generator=gen) / in_f**0.5
                                                             ).to(torch.bfloat16)
        tensors[f"base_model.model.{name}.lora_B.weight"] = (torch.randn(out_f, RANK, generator=gen) / RANK**0.5
                                                             ).to(torch.bfloat16)
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 32,
           "target_modules": list(SHAPES), "base_model_name_or_path": "bench/llama-1b"}
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def wall(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/bench_diff")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    a, b = work / "a", work / "b"
    write_adapter(a, 1)
    write_adapter(b, 2)

    import numpy as np
    from safetensors.torch import load_file

    from loratool.ops.diff import diff

    diff(a, b)  # warm: torch imported, files in the page cache
    times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        report = diff(a, b)
        times.append(time.perf_counter() - t)
    assert len(report.modules) == 400
    sa, sb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    for m in report.modules[:3]:
        da = 2.0 * (sa[f"base_model.model.{m.name}.lora_B.weight"].double().numpy()
                    @ sa[f"base_model.model.{m.name}.lora_A.weight"].double().numpy())
        db = 2.0 * (sb[f"base_model.model.{m.name}.lora_B.weight"].double().numpy()
                    @ sb[f"base_model.model.{m.name}.lora_A.weight"].double().numpy())
        want = np.linalg.norm(da - db) / np.linalg.norm(da)
        assert abs(m.rel_distance - want) <= 1e-6 * want, (m.name, m.rel_distance, want)
    cli = [wall([sys.executable, "-m", "loratool", "diff", str(a), str(b), "--json"]) for _ in range(args.repeat)]
    startup = [wall([sys.executable, "-m", "loratool", "--version"]) for _ in range(args.repeat)]
    torch_import = [wall([sys.executable, "-c", "import torch"]) for _ in range(args.repeat)]
    size = sum(f.stat().st_size for f in a.iterdir())
    print(f"400 modules, r{RANK}, {size / 1e6:.0f} MB per adapter: diff() {statistics.median(times):.3f} s "
          f"(runs {' '.join(f'{t:.3f}' for t in times)}) | `loratool diff --json` {statistics.median(cli):.2f} s | "
          f"`loratool --version` {statistics.median(startup):.2f} s | `python -c 'import torch'` "
          f"{statistics.median(torch_import):.2f} s")
    print(f"machine: {os.cpu_count()} cpus; load average {os.getloadavg()}")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
