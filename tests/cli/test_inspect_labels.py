"""What inspect calls things (issue 29, item 7): the header's training metadata settles a family
the names leave open, modelspec.architecture is an architecture (not a base model), and a ComfyUI
file says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clirun import run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loratool.families import detect
from loratool.formats import read

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
KOHYA = FIXTURES / "kohya_sd.safetensors"


def _names() -> list[str]:
    return [n for n in read(KOHYA).modules if not n.startswith("lora_te")]


def test_the_names_alone_fit_sd1_and_sdxl():
    det = detect(_names())
    assert det.ambiguous and set(det.tied) == {"sd1", "sdxl"}


@pytest.mark.parametrize(("meta", "family"), [
    ({"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"),
    ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl"),
    ({"ss_base_model_version": "sd_v1"}, "sd1"),
    ({"modelspec.architecture": "stable-diffusion-v1/lora"}, "sd1"),
])
def test_metadata_breaks_the_tie(meta, family):
    det = detect(_names(), meta)
    assert det.family == family and not det.ambiguous and det.confident
    assert any("says" in r for r in det.reasons), det.reasons


def test_metadata_naming_a_family_the_names_do_not_fit_changes_nothing():
    det = detect(_names(), {"ss_base_model_version": "flux1"})
    assert det.ambiguous


def test_the_sdxl_fixture_is_shown_as_sdxl_with_its_architecture():
    r = run_cli(["inspect", KOHYA], env={"COLUMNS": "200"})
    assert r.code == 0, r.err
    rows = {line.split("  ", 1)[0]: line.split("  ", 1)[1].strip() for line in r.out.splitlines()[1:]
            if "  " in line and not line.startswith(" ")}
    assert rows["family"].startswith("sdxl, kohya dialect"), rows["family"]
    assert "ss_base_model_version says sdxl_base_v1-0" in rows["family"]
    assert rows["base model"] == "sd_xl_base_1.0.safetensors"
    assert rows["architecture"] == "stable-diffusion-xl-v1-base/lora"
    doc = json.loads(run_cli(["inspect", KOHYA, "--json"]).out)
    assert doc["family"]["family"] == "sdxl" and doc["dialect"] is None


def test_an_architecture_alone_is_not_a_base_model(tmp_path):
    with safe_open(str(KOHYA), "pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "ss_sd_model_name"}
    src = tmp_path / "arch_only.safetensors"
    save_file(load_file(str(KOHYA)), str(src), metadata=meta)
    r = run_cli(["inspect", src], env={"COLUMNS": "200"})
    lines = r.out.splitlines()
    assert any(line.split() == ["base", "model", "(not", "recorded)"] for line in lines), r.out
    assert any(line.split() == ["architecture", "stable-diffusion-xl-v1-base/lora"] for line in lines), r.out
    assert json.loads(run_cli(["inspect", src, "--json"]).out)["base_model"] is None


@pytest.mark.parametrize("layout", ["comfyui_flux_lorasave", "comfyui_flux_ab"])
def test_a_comfyui_file_shows_as_comfyui(tmp_path, layout):
    from fixtures.wild import LAYOUTS, write_layout

    path = write_layout(LAYOUTS[layout], tmp_path)
    r = run_cli(["inspect", path])
    assert r.code == 0, r.err
    assert r.out.splitlines()[0].startswith(f"{path}  (comfyui, "), r.out
    assert json.loads(run_cli(["inspect", path, "--json"]).out)["dialect"] == "comfyui"


def test_what_convert_writes_for_comfyui_shows_as_comfyui(tmp_path):
    from fixtures.wild import LAYOUTS, write_layout

    src = write_layout(LAYOUTS["kohya_flux"], tmp_path)  # with lora_te1_ modules, which stay kohya-named
    out = tmp_path / "c.safetensors"
    assert run_cli(["convert", src, "--to", "comfyui", "-o", out]).code == 0
    assert run_cli(["inspect", out]).out.splitlines()[0].startswith(f"{out}  (comfyui, kohya keys, ")
