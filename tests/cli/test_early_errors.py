"""Simple mistakes are reported before torch is imported (issue 29, item 4).

Importing torch costs 1.7-2.4 s of CPU (far more on a busy machine); an existing -o without
--force, a --device that names no device, a regex that does not compile or an option combination
that makes no sense need none of it. Each case runs `loratool` in a fresh interpreter that reports
whether torch was imported by the time the command returned, and the CPU time of that process
(user + system, from resource.getrusage: CPU, not wall time, so a busy machine does not fail it)
must stay under 0.5 s.
"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
PEFT = str(FIXTURES / "peft_llama")
BASE = str(FIXTURES / "base_llama")
KOHYA = str(FIXTURES / "kohya_sd.safetensors")

DRIVER = """
import sys
from loratool.cli import cli
code = cli.main(args=sys.argv[1:], prog_name="loratool", standalone_mode=False)
print("torch imported:", "torch" in sys.modules)
sys.exit(code)
"""


# each runs in a fresh folder holding `exists/` and `exists.safetensors`; `new` must not appear
CASES: dict[str, tuple[list[str], str]] = {
    "resize -o exists": (["resize", PEFT, "-o", "exists", "--rank", "2"], "exists: already exists"),
    "convert -o exists": (["convert", KOHYA, "--to", "kohya", "-o", "exists.safetensors"], "already exists"),
    "merge -o exists": (["merge", BASE, PEFT, "-o", "exists"], "exists: already exists"),
    "combine -o exists": (["combine", PEFT, PEFT, "-o", "exists"], "exists: already exists"),
    "rescale -o exists": (["rescale", PEFT, "-o", "exists", "--factor", "2"], "exists: already exists"),
    "extract -o exists": (["extract", BASE, BASE, "-o", "exists", "--rank", "2"], "exists: already exists"),
    "merge --device gpu": (["merge", BASE, PEFT, "-o", "new", "--device", "gpu"], "--device gpu: not a device"),
    "resize --device cuda0": (["resize", PEFT, "-o", "new", "--rank", "2", "--device", "cuda0"], "--device cuda0"),
    "verify --device gpu": (["verify", "new", PEFT, "--base", BASE, "--device", "gpu"], "--device gpu"),
    "merge --module-weights": (["merge", BASE, PEFT, "-o", "new", "--module-weights", "(=1"],
                               "is not a regular expression"),
    "merge --blocks": (["merge", BASE, PEFT, "-o", "new", "--blocks", "sdxl:1,2"], "--blocks sdxl"),
    "resize --modules": (["resize", PEFT, "-o", "new", "--rank", "2", "--modules", "[a"], "--modules '[a'"),
    "combine ties": (["combine", PEFT, PEFT, "-o", "new", "--method", "ties"], "needs --density"),
    "combine density": (["combine", PEFT, PEFT, "-o", "new", "--method", "ties", "--density", "2"],
                        "--density 2.0: must be in (0, 1]"),
    "combine --rank cat": (["combine", PEFT, PEFT, "-o", "new", "--rank", "4"], "--rank does not apply"),
    "rescale --factor 0": (["rescale", PEFT, "-o", "new", "--factor", "0"], "--factor 0 would make"),
    "rescale --alpha nan": (["rescale", PEFT, "-o", "new", "--alpha", "nan"], "--alpha needs a finite number"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reported_before_torch_is_imported(case, tmp_path):
    args, message = CASES[case]
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists.safetensors").write_bytes(b"x")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run([sys.executable, "-c", DRIVER, *args], stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert r.returncode == 2, (r.stdout, r.stderr)
    errors = [line for line in r.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], r.stderr
    assert "torch imported: False" in r.stdout, r.stdout
    assert cpu < 0.5, f"{case}: {cpu:.2f} s of CPU before the error"
    assert not (tmp_path / "new").exists()

