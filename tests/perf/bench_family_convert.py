"""Benchmark: `loratool convert` of a full-size FLUX.1 LoRA (rank 32, every module) between dialects.

Input: a kohya (sd-scripts) FLUX.1 LoRA with the real dimensions (hidden 3072, MLP 12288, 19 double
and 38 single blocks; every block module: 304, of which 76 fused), rank 32, bf16, generated from the
family table by fixtures/families.py (about 300 MB).

Measured, best of --repeat runs:
  * start-up: `python -m loratool --version` (interpreter + imports);
  * kohya -> diffusers (the 76 fused qkv / linear1 modules split: 608 modules written);
  * diffusers -> kohya --family flux.1 (fuse back, shared A: bit-identical);
  * the work beyond start-up = convert time − start-up;
  * in-process (torch already imported): the whole `ops.convert.convert` call, and the family
    maths alone (`families.convert.convert_family` on the read adapter: the split / fuse, no I/O).

Run: python tests/perf/bench_family_convert.py [--repeat 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(args: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "loratool", *args], check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", type=Path, default=None)
    opts = ap.parse_args()
    import torch
    from safetensors.torch import load_file, save_file

    spec = importlib.util.spec_from_file_location("fixture_families", ROOT / "fixtures" / "families.py")
    assert spec is not None and spec.loader is not None
    fam = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fam)
    root = opts.keep or Path(tempfile.mkdtemp(prefix="bench_family_"))
    root.mkdir(parents=True, exist_ok=True)
    src = root / "flux_kohya.safetensors"
    if not src.exists():
        save_file(fam.flux_lora("kohya", hidden=3072, double=19, single=38, rank=32, alpha=16.0,
                                dtype=torch.bfloat16), str(src))
    size = src.stat().st_size
    dif, back = root / "flux_diffusers.safetensors", root / "flux_back.safetensors"
    start = min(run(["--version"]) for _ in range(opts.repeat))
    split = [run(["convert", str(src), "--to", "diffusers", "-o", str(dif), "--force", "-q"])
             for _ in range(opts.repeat)]
    fuse = [run(["convert", str(dif), "--to", "kohya", "--family", "flux.1", "-o", str(back), "--force", "-q"])
            for _ in range(opts.repeat)]
    a, b = load_file(str(src)), load_file(str(back))
    identical = set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    print(f"input {size / 1e6:.0f} MB, {sum(k.endswith('.lora_down.weight') for k in a)} modules")
    print(f"start-up (--version): {start:.3f} s")
    print(f"kohya -> diffusers: best {min(split):.3f} s ({', '.join(f'{t:.3f}' for t in split)}); "
          f"beyond start-up {min(split) - start:.3f} s")
    print(f"diffusers -> kohya --family flux.1: best {min(fuse):.3f} s ({', '.join(f'{t:.3f}' for t in fuse)}); "
          f"beyond start-up {min(fuse) - start:.3f} s")
    print(f"round trip bit-identical: {identical}")
    from loratool.families import get
    from loratool.families.convert import convert_family
    from loratool.formats import read
    from loratool.ops.convert import convert

    for label, path, to, extra in (("kohya -> diffusers", src, "diffusers", {}),
                                   ("diffusers -> kohya", dif, "kohya", {"family": "flux.1"})):
        whole, maths = [], []
        for _ in range(opts.repeat):
            t = time.perf_counter()
            convert(path, root / "inproc.safetensors", to=to, force=True, **extra)
            whole.append(time.perf_counter() - t)
            adapter = read(path)
            torch.set_num_threads(1)
            t = time.perf_counter()
            conv = convert_family(adapter, get("flux.1"), "kohya" if to == "diffusers" else "diffusers", to)
            for m in conv.modules.values():  # the factors as written (lazy slices are materialised)
                m.up.load().contiguous()
            maths.append(time.perf_counter() - t)
        print(f"in-process {label}: convert() best {min(whole):.3f} s; split/fuse maths alone best {min(maths):.3f} s")


if __name__ == "__main__":
    main()
