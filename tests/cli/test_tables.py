"""Module tables at 80 and 200 columns: names are never folded into narrow columns (kohya names
are 50-90 characters); at 80 columns a name gets its own line and no line is wider than 80."""

from __future__ import annotations

from pathlib import Path

import pytest
from clirun import run_cli
from safetensors import safe_open

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
KOHYA = FIXTURES / "kohya_sd.safetensors"


def _kohya_names() -> list[str]:
    with safe_open(str(KOHYA), "pt") as f:
        return sorted({k.split(".")[0] for k in f.keys()})  # noqa: SIM118


def _commands(tmp_path: Path) -> dict[str, list[str]]:
    return {
        "inspect": ["inspect", str(KOHYA), "--modules", "--spectrum", "--device", "cpu"],
        "inspect-modules": ["inspect", str(KOHYA), "--modules"],
        "resize": ["resize", str(KOHYA), "-o", str(tmp_path / "r.safetensors"), "--rank", "2"],
        "rescale": ["rescale", str(KOHYA), "-o", str(tmp_path / "s.safetensors"), "--factor", "0.5"],
        "convert": ["convert", str(KOHYA), "--to", "peft", "-o", str(tmp_path / "p")],
    }


@pytest.mark.parametrize("command", ["inspect", "inspect-modules", "resize", "rescale", "convert"])
@pytest.mark.parametrize("columns", [80, 200])
def test_names_stay_whole(command, columns, tmp_path):
    r = run_cli(_commands(tmp_path)[command], env={"COLUMNS": str(columns)})
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    table = [line for line in lines if any(n in line for n in _kohya_names())]
    for name in _kohya_names():
        # each kohya name appears whole on a line (in convert: as the `from` column)
        assert any(name in line.split() for line in table), (name, r.out)
    if columns == 80:
        # a table line never exceeds 80 columns (metadata values may; they are not tables)
        start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("module"))
        assert all(len(line) <= 80 for line in lines[start:] if not line.startswith("Wrote")), r.out
    else:
        # wide enough: one line per module, its name first and its values after it
        rows = [line for line in table if line.split()[0] in _kohya_names() or command == "convert"]
        assert len(rows) == len(_kohya_names()) and all(len(row.split()) > 2 for row in rows), r.out


def test_spectrum_keeps_its_columns_at_80(tmp_path):
    r = run_cli(_commands(tmp_path)["inspect"], env={"COLUMNS": "80"})
    header = next(line for line in r.out.splitlines() if "r90" in line)
    assert header.split() == ["out", "in", "rank", "alpha", "scale", "r90", "r99", "σ1", "spectrum"]
