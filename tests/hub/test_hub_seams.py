"""hf:// inputs in the library (issue #14 item 2): every operation resolves them itself, so Python
callers get what the CLI gives, and an output's provenance names the repo and commit it came from
(`hf://OWNER/REPO@SHA/PATH`), not a cache folder (`<sha>/adapter_model.safetensors`, before)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ALICE, Run, fixture_files
from hubserver import HubServer
from safetensors import safe_open

import loratool
from loratool.ops.combine import combine
from loratool.ops.convert import convert
from loratool.ops.inspect import inspect_adapter
from loratool.ops.merge import merge
from loratool.ops.rescale import rescale
from loratool.ops.resize import resize
from loratool.ops.validate import validate_adapter


@pytest.fixture
def repos(hub: HubServer, hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    """alice/lora (peft_llama) and alice/base (base_llama); the environment points at the local Hub."""
    hub.add_repo("alice/lora", fixture_files("peft_llama"))
    hub.add_repo("alice/base", fixture_files("base_llama"))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_TOKEN", ALICE)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return hub


def _sources(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return json.loads(meta["loratool.sources"])


def _params(path: Path) -> dict[str, object]:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["loratool.params"])


def test_python_callers_can_pass_hf_paths(repos: HubServer, tmp_path: Path) -> None:
    assert loratool.read("hf://alice/lora").source_format == "peft"
    assert loratool.detect("hf://alice/lora") == "peft"
    assert inspect_adapter("hf://alice/lora").adapter.source_format == "peft"
    report = validate_adapter("hf://alice/lora", base="hf://alice/base")
    assert report.ok and len(report.matched) == 14
    resize("hf://alice/lora", tmp_path / "r", rank=2)
    combine(["hf://alice/lora", tmp_path / "r"], tmp_path / "c", weights=[1.0, -1.0], method="cat")
    merge("hf://alice/base", ["hf://alice/lora"], tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors.index.json").is_file()


def test_provenance_keeps_the_repo_and_commit(repos: HubServer, tmp_path: Path) -> None:
    sha = repos.repos["alice/lora"].branches["main"]
    rescale("hf://alice/lora", tmp_path / "half", mode="factor", value=0.5)
    assert set(_sources(tmp_path / "half" / "adapter_model.safetensors")) == {
        f"hf://alice/lora@{sha}/adapter_model.safetensors", f"hf://alice/lora@{sha}/adapter_config.json"}

    base_sha = repos.repos["alice/base"].branches["main"]
    convert("hf://alice/lora", tmp_path / "k.safetensors", to="kohya", base="hf://alice/base")
    assert _params(tmp_path / "k.safetensors")["base"] == f"hf://alice/base@{base_sha}"

    merge("hf://alice/base", ["hf://alice/lora"], tmp_path / "m")
    sources = _sources(tmp_path / "m" / "model-00001-of-00002.safetensors")
    assert f"hf://alice/base@{base_sha}/model-00001-of-00002.safetensors" in sources
    assert f"hf://alice/lora@{sha}/adapter_model.safetensors" in sources


def test_the_cli_records_the_same_provenance(run_main: Callable[..., Run], repos: HubServer, tmp_path: Path) -> None:
    sha = repos.repos["alice/lora"].branches["main"]
    r = run_main("rescale", "hf://alice/lora", "--factor", "2", "-o", str(tmp_path / "x"))
    assert r.code == 0, r.stderr
    assert f"hf://alice/lora@{sha}/adapter_model.safetensors" in _sources(tmp_path / "x" / "adapter_model.safetensors")


def test_local_sources_keep_folder_and_file(tmp_path: Path) -> None:
    from loratool.formats import source_label

    assert source_label(tmp_path / "lora" / "adapter_model.safetensors") == "lora/adapter_model.safetensors"
    cached = tmp_path / "hub" / "models--alice--my-lora.v2" / "snapshots" / ("0" * 40) / "sub" / "a.safetensors"
    assert source_label(cached) == f"hf://alice/my-lora.v2@{'0' * 40}/sub/a.safetensors"
