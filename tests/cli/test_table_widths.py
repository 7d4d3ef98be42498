"""Every table at 80 and 200 columns, rendered by a real `loratool` process (issue 29, items 1-3).

The width comes from COLUMNS, else from a terminal on any of stdout / stderr / stdin (so
`loratool diff ... | less` on an 80-column terminal is 80 wide), else 160. Each case runs every
table-printing command in one subprocess (one torch import) through a pseudo-terminal of the given
width, through a pipe with COLUMNS set, and through a pipe whose stderr is the terminal; then every
module name must appear whole and no line may be wider than the width unless it is one unbreakable
word. Names sort naturally (double_blocks_2 before double_blocks_10).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from clirun import run_cli
from ptyrun import on_a_terminal
from safetensors import safe_open
from safetensors.torch import save_file

from loratool.cli._render import natural_key, natural_sorted

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures"
KOHYA = FIXTURES / "kohya_sd.safetensors"
BASE = FIXTURES / "base_sd.safetensors"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
MARK = "=== loratool"

# run the commands one after the other in one interpreter, a marker line before each
DRIVER = f"""MARK = {MARK!r}
import json, sys
from loratool.cli import cli
failed = []
for name, args in json.loads(sys.argv[1]):
    print(MARK + " " + name, flush=True)
    code = cli.main(args=args, prog_name="loratool", standalone_mode=False)
    sys.stdout.flush()
    if code != (1 if name == "validate" else 0):
        failed.append((name, code))
sys.exit(f"failed: {{failed}}" if failed else 0)
"""


def _stems(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return sorted({k.split(".")[0] for k in f.keys()})  # noqa: SIM118


def _blocks_file(path: Path) -> Path:
    """A kohya FLUX.1-style file whose block numbers sort differently as text and as numbers."""
    tensors = {}
    for i in (0, 1, 2, 10, 11, 3):
        stem = f"lora_unet_double_blocks_{i}_img_attn_proj"
        tensors[f"{stem}.lora_down.weight"] = torch.randn(2, 8)
        tensors[f"{stem}.lora_up.weight"] = torch.randn(8, 2)
        tensors[f"{stem}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[tuple[str, list[str]]], dict[str, list[str]], Path]:
    """(commands to run, the names each must show whole, the folder its outputs go to)."""
    d = tmp_path_factory.mktemp("widths")
    from fixtures.wild import LAYOUTS, write_layout

    sdxl = write_layout(LAYOUTS["kohya_sdxl"], d)  # its modules do not fit base_sd: a finding per module
    resized, merged = d / "resized.safetensors", d / "merged.safetensors"
    assert run_cli(["resize", KOHYA, "-o", resized, "--rank", "2"]).code == 0
    assert run_cli(["merge", BASE, KOHYA, "-o", merged]).code == 0
    blocks = _blocks_file(d / "blocks.safetensors")
    with safe_open(str(BASE), "pt") as f:
        base_keys = sorted(f.keys())
    kohya = _stems(KOHYA)
    out = d / "out"
    commands = [
        ("inspect", ["inspect", str(KOHYA), "--modules"]),
        ("spectrum", ["inspect", str(KOHYA), "--spectrum", "--device", "cpu"]),
        ("blocks", ["inspect", str(blocks), "--modules"]),
        ("validate", ["validate", str(sdxl), "--base", str(BASE)]),
        ("diff", ["diff", str(KOHYA), str(resized), "--all"]),
        ("verify", ["verify", str(merged), str(KOHYA), "--base", str(BASE), "--all"]),
        ("resize", ["resize", str(KOHYA), "-o", str(out / "r.safetensors"), "--rank", "2"]),
        ("rescale", ["rescale", str(KOHYA), "-o", str(out / "s.safetensors"), "--factor", "0.5"]),
        ("combine", ["combine", str(KOHYA), str(resized), "-o", str(out / "c.safetensors")]),
        ("convert", ["convert", str(KOHYA), "--to", "peft", "-o", str(out / "p")]),
        ("extract", ["extract", str(BASE), str(merged), "-o", str(out / "e"), "--rank", "2"]),
    ]
    # the merged tensors whose names verify lists (those the adapter changed and those it did not)
    names = {name: kohya for name, _ in commands}
    names["blocks"] = _stems(blocks)
    names["validate"] = _stems(sdxl)
    names["verify"] = base_keys
    r = run_cli(["extract", BASE, merged, "-o", d / "e", "--rank", "2", "--json"])
    names["extract"] = [m["name"] for m in json.loads(r.out)["modules"]]
    assert len(names["extract"]) == len(kohya)
    return commands, names, out


def _run(commands: list[tuple[str, list[str]]], out: Path, *, columns: int, mode: str) -> str:
    """stdout of the driver: `pty` (stdout a terminal `columns` wide, no COLUMNS), `pipe` (COLUMNS
    set), `stderr-pty` (stdout a pipe, stderr the terminal, no COLUMNS)."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "LORATOOL_DEBUG")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    argv = [sys.executable, "-c", DRIVER, json.dumps(commands)]
    if mode == "pipe":
        env["COLUMNS"] = str(columns)
        r = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout

    def run(tty: int) -> subprocess.CompletedProcess[str]:
        if mode == "pty":
            return subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=tty, stderr=subprocess.PIPE,
                                  text=True, timeout=300)
        return subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=tty,
                              text=True, timeout=300)

    p, shown = on_a_terminal(run, columns=columns)
    assert p.returncode == 0, (p.stderr, shown[-2000:])
    text = p.stdout if mode != "pty" else shown.decode("utf-8", "replace")
    return ANSI.sub("", text).replace("\r\n", "\n").replace("\r", "")


def _sections(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith(MARK):
            current = line[len(MARK):].strip()
            found[current] = []
        elif current is not None:
            found[current].append(line)
    return found


def _whole(name: str, line: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(name)}(?![\w.])", line) is not None


@pytest.mark.parametrize(("mode", "columns"),
                         [("pty", 80), ("pty", 200), ("pipe", 80), ("pipe", 200), ("stderr-pty", 80)])
def test_every_table_keeps_names_whole_within_the_width(cases, mode, columns):
    commands, names, out = cases
    sections = _sections(_run(commands, out, columns=columns, mode=mode))
    assert set(sections) == {name for name, _ in commands}
    for command, lines in sections.items():
        assert lines, command
        for name in names[command]:
            assert any(_whole(name, line) for line in lines), (mode, columns, command, name, "\n".join(lines))
        for line in lines:
            # wider than the terminal only when the line is one word (a name longer than the width),
            # or the closing `Wrote ...` line, which stays one line for scripts (`tail -1`)
            assert len(line) <= columns or len(line.split()) == 1 or line.startswith("Wrote "), \
                (mode, columns, command, line)
        if command in ("inspect", "resize", "rescale", "combine", "blocks"):  # diff: the largest distance first
            # names are sorted naturally: the order in which the names show up
            shown = [n for line in lines for n in line.split() if n in names[command]]
            assert shown == natural_sorted(names[command]), (command, shown)
    if columns == 200:
        # wide enough for one line per module: each kohya name starts a line with its values after it
        rows = [line for line in sections["inspect"] if line.split() and line.split()[0] in names["inspect"]]
        assert len(rows) == len(names["inspect"]) and all(len(r.split()) > 5 for r in rows)
    else:
        # 80 columns: at least one table had to put names on lines of their own
        assert any(line.strip() in names["inspect"] for line in sections["inspect"])


def test_no_terminal_and_no_columns_is_160(cases):
    commands, names, _ = cases
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(commands[:1])], env=env, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=300)
    lines = _sections(r.stdout)["inspect"]
    rows = [line for line in lines if line.split() and line.split()[0] in names["inspect"]]
    assert len(rows) == len(names["inspect"])  # one line per module: wider than 80


def test_natural_order():
    names = ["double_blocks_10", "double_blocks_2", "double_blocks_1", "single_blocks_0", "double_blocks_0_x"]
    assert natural_sorted(names) == ["double_blocks_0_x", "double_blocks_1", "double_blocks_2", "double_blocks_10",
                                     "single_blocks_0"]
    assert natural_key("a9") < natural_key("a10") and natural_key("a10") < natural_key("b1")
