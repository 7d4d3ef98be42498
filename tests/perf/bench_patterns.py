"""Benchmark: header-only `loratool inspect --json` on adapters with large rank_pattern / alpha_pattern.

Issue #11 item 14: every pattern lookup compiled a fresh regex, so a pattern per module (what a
dynamic `resize` writes: 560 modules) took 12.5 s to inspect, 2k patterns 9 s, 20k patterns 92 s.

Input: a PEFT adapter with 80 layers x 7 Llama targets = 560 modules (tiny 16x16 factors; the
timing is about the config, not the tensors), ranks alternating 2 and 4, and a config whose
rank_pattern and alpha_pattern hold N keys each: one exact (escaped) name per module, then extra
keys for layers the adapter does not have (as a config shared across checkpoints may); --style
plain writes the names unescaped (dots as regex wildcards, as hand-written configs do), --style
regex adds one real regex per layer.

Measured: the whole process (`python -m loratool inspect DIR --json`), and inspect_adapter() alone
(imports excluded) in a fresh process, best of --repeat runs each; the
result is checked (every module's rank and alpha as the patterns say).

Run: python tests/perf/bench_patterns.py [--patterns 560 2000 20000] [--repeat 3] [--style escaped|plain|regex]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
LAYERS = 80


def build(root: Path, n_patterns: int, style: str) -> tuple[Path, dict[str, tuple[int, int]]]:
    import torch
    from safetensors.torch import save_file

    names = [f"model.layers.{i}.{t}" for i in range(LAYERS) for t in TARGETS]
    want = {n: (2 if k % 2 else 4, 3 + k % 5) for k, n in enumerate(names)}  # rank, alpha
    tensors = {}
    for n, (r, _) in want.items():
        tensors[f"base_model.model.{n}.lora_A.weight"] = torch.zeros(r, 16)
        tensors[f"base_model.model.{n}.lora_B.weight"] = torch.zeros(16, r)
    d = root / f"adapter_{n_patterns}_{style}"
    d.mkdir()
    save_file(tensors, d / "adapter_model.safetensors")

    def key(name: str) -> str:
        return name if style == "plain" else "^" + re.escape(name)

    rank_pattern = {key(n): r for n, (r, _) in want.items()}
    alpha_pattern = {key(n): a for n, (_, a) in want.items()}
    i = LAYERS
    while len(rank_pattern) < n_patterns:
        if style == "regex" and i % 7 == 0:
            k = rf"layers\.{i}\.(self_attn|mlp)\.\w+_proj"
        else:
            k = key(f"model.layers.{i}.{TARGETS[i % 7]}")
        rank_pattern[k] = 8
        alpha_pattern[k] = 8
        i += 1
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "target_modules": list(TARGETS),
              "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    # sorted, as loratool, peft and diffusers write configs: lookups no longer follow file order
    (d / "adapter_config.json").write_text(json.dumps(config, sort_keys=True))
    return d, want


_IN_PROCESS = (
    "import sys, time; from loratool.ops.inspect import inspect_adapter; t = time.perf_counter(); "
    "inspect_adapter(sys.argv[1]).to_dict(); print(time.perf_counter() - t)"
)


def run(path: Path) -> tuple[float, float, dict]:
    """(whole process, inspect_adapter alone in a fresh process, the JSON document)."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "loratool", "inspect", str(path), "--json"], capture_output=True,
                       text=True, check=True)
    whole = time.perf_counter() - t0
    q = subprocess.run([sys.executable, "-c", _IN_PROCESS, str(path)], capture_output=True, text=True, check=True)
    return whole, float(q.stdout), json.loads(p.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patterns", type=int, nargs="+", default=[560, 2000, 20000])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--style", choices=["escaped", "plain", "regex"], default="escaped")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.patterns:
            path, want = build(Path(tmp), n, args.style)
            times, inner = [], []
            for _ in range(args.repeat):
                t, t_in, doc = run(path)
                times.append(t)
                inner.append(t_in)
            got = {m["name"]: (m["rank"], m["alpha"]) for m in doc["modules"]}
            assert got == want, "inspect disagrees with the patterns"
            shown = ", ".join(f"{t:.3f}" for t in times)
            print(f"{len(want)} modules, {n} patterns ({args.style}): whole process best {min(times):.3f} s "
                  f"(runs: {shown}); inspect_adapter alone best {min(inner):.3f} s")


if __name__ == "__main__":
    main()
