"""combine refuses inputs that adapt different models, or one model in two namings (issue 29, item 6)."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
from clirun import run_cli

from loratool.formats import read

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def _deltas(path: Path) -> dict[str, np.ndarray]:
    a = read(path)
    return {n: m.scale * (m.up.load().float().numpy().reshape(m.out_features, -1)
                          @ m.down.load().float().numpy().reshape(m.rank, -1)) for n, m in a.modules.items()}


def test_adapters_for_different_models_are_refused(tmp_path):
    r = run_cli(["combine", FIXTURES / "peft_llama", FIXTURES / "peft_gpt2", "-o", tmp_path / "c"])
    assert r.code == 2
    err = next(line for line in r.err.splitlines() if line.startswith("Error:"))
    assert "different models" in err and "tiny-llama" in err and "tiny-gpt2" in err
    assert "--allow-different-bases" in r.err.splitlines()[-1]
    assert not (tmp_path / "c").exists()


def test_allow_different_bases_combines_with_a_warning(tmp_path):
    r = run_cli(["combine", FIXTURES / "peft_llama", FIXTURES / "peft_gpt2", "-o", tmp_path / "c",
                 "--allow-different-bases"])
    assert r.code == 0, r.err
    assert "different base models: tiny-llama, tiny-gpt2" in " ".join(r.err.split())


def test_one_model_in_two_namings_says_how_to_convert(tmp_path, monkeypatch):
    from fixtures.wild import LAYOUTS, write_layout

    kohya = write_layout(LAYOUTS["kohya_flux"], tmp_path)
    diffusers = tmp_path / "as_diffusers.safetensors"
    assert run_cli(["convert", kohya, "--to", "diffusers", "-o", diffusers]).code == 0
    r = run_cli(["combine", kohya, diffusers, "-o", tmp_path / "c.safetensors"])
    assert r.code == 2
    err = next(line for line in r.err.splitlines() if line.startswith("Error:"))
    assert "flux.1" in err and "kohya names" in err and "diffusers names" in err
    hint = r.err.splitlines()[-1]
    assert "loratool convert" in hint
    # the command the hint gives works, and then combine adds each module to itself, exactly
    command = hint.split("first: ", 1)[1].split(", then", 1)[0]
    args = shlex.split(command)
    assert args[0] == "loratool"
    monkeypatch.chdir(tmp_path)
    assert run_cli(args[1:]).code == 0
    converted = tmp_path / args[args.index("-o") + 1]
    r = run_cli(["combine", kohya, converted, "-o", tmp_path / "c.safetensors"])
    assert r.code == 0, r.err
    before, after = _deltas(kohya), _deltas(tmp_path / "c.safetensors")
    assert set(after) == set(before)
    for name, d in before.items():  # the file is bf16: the sum is rounded to bf16 again (8 bits of mantissa)
        assert np.linalg.norm(after[name] - 2 * d) <= 1e-2 * np.linalg.norm(2 * d), name
