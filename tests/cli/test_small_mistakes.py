"""Small mistakes get a message that says what to do (issue 29, item 9)."""

from __future__ import annotations

from pathlib import Path

import pytest
from clirun import run_cli

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures"


def _error(r) -> tuple[str, str]:
    errors = [line for line in r.err.splitlines() if line.startswith("Error:")]
    hints = [line for line in r.err.splitlines() if line.startswith("Hint:")]
    assert r.code == 2 and len(errors) == 1 and len(hints) <= 1, r.err
    return errors[0], hints[0] if hints else ""


@pytest.mark.parametrize(("given", "meant"), [("flux", "flux.1"), ("FLUX.1", "flux.1"), ("sd15", "sd1"),
                                              ("hunyuan", "hunyuan-video"), ("ltx", "ltx-video")])
def test_unknown_family_says_which_was_meant(tmp_path, given, meant):
    err, hint = _error(run_cli(["convert", FIXTURES / "kohya_sd.safetensors", "--to", "diffusers", "--family", given,
                                "-o", tmp_path / "x.safetensors"]))
    assert f"--family {given}: unknown family; did you mean {meant}?" in err
    assert "flux.1" in hint and "sdxl" in hint
    assert not (tmp_path / "x.safetensors").exists()


def test_a_family_name_like_no_other_gets_the_list(tmp_path):
    err, hint = _error(run_cli(["convert", FIXTURES / "kohya_sd.safetensors", "--to", "diffusers", "--family",
                                "pixart", "-o", tmp_path / "x.safetensors"]))
    assert err.endswith("unknown family") and hint.startswith("Hint: known: flux.1")


def test_rescale_factor_0_is_refused(tmp_path):
    err, hint = _error(run_cli(["rescale", FIXTURES / "peft_llama", "-o", tmp_path / "o", "--factor", "0"]))
    assert "--factor 0 would make every delta zero" in err and "--module-weights" in hint
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("base", "adapter"), [("peft_llama", "base_llama"),
                                               ("kohya_sd.safetensors", "base_sd.safetensors")])
def test_merge_with_base_and_adapter_swapped_asks(tmp_path, base, adapter):
    err, hint = _error(run_cli(["merge", FIXTURES / base, FIXTURES / adapter, "-o", tmp_path / "m"]))
    assert str(FIXTURES / adapter) in err
    assert hint.startswith("Hint: did you swap them?")
    assert f"loratool merge {FIXTURES / adapter} {FIXTURES / base} -o OUT" in hint
    assert not (tmp_path / "m").exists()


def test_merge_of_a_wrong_adapter_into_a_real_base_does_not_ask(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    _, hint = _error(run_cli(["merge", FIXTURES / "base_llama", tmp_path, "-o", tmp_path / "m"]))
    assert "swap" not in hint


@pytest.mark.parametrize("path", ["README.md", "pyproject.toml"])
def test_inspect_of_a_text_file_says_it_is_not_safetensors(path):
    err, _ = _error(run_cli(["inspect", ROOT / path]))
    assert err == f"Error: {ROOT / path}: not a safetensors file (it does not begin with a safetensors header)"


def test_unmatched_modules_name_the_adapter_file(tmp_path):
    err, _ = _error(run_cli(["merge", FIXTURES / "base_gpt2", FIXTURES / "peft_llama", "-o", tmp_path / "m"]))
    assert err.startswith(f"Error: {FIXTURES / 'peft_llama' / 'adapter_model.safetensors'}: 14 unmatched module(s)")
