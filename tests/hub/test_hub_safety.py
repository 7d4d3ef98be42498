"""Issue #12 through the Hub: hostile repository file names, pull -o with --force, merge from hf://.

Every run checks that nothing outside -o changed (a snapshot of tmp_path before and after) and the
run_* fixtures check that no token is printed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Run, assert_clean_error, fixture_files
from hubserver import HubServer
from test_safety import snapshot

Cli = Callable[..., Run]


@pytest.fixture
def repos(hub: HubServer) -> HubServer:
    hub.add_repo("alice/lora", fixture_files("peft_llama"))
    hub.add_repo("alice/base", fixture_files("base_llama"))
    evil = fixture_files("peft_llama")
    evil["../../escape.json"] = b'{"owned": true}'
    hub.add_repo("alice/evil", evil)
    return hub


def test_repository_file_name_with_dotdot_is_refused(run_main: Cli, repos: HubServer, tmp_path: Path,
                                                     hf_home: Path) -> None:
    before = snapshot(tmp_path)
    r = run_main("pull", "alice/evil", "-o", str(tmp_path / "out"))
    line = assert_clean_error(r, "hf://alice/evil", "repository file name '../../escape.json'", "contains '..'")
    assert "outside" in r.stderr
    after = snapshot(tmp_path)
    outside_cache = {k for k in before.keys() | after.keys() if not k.startswith("hf_home")}
    assert {k: before.get(k) for k in outside_cache} == {k: after.get(k) for k in outside_cache}, line
    assert not list(tmp_path.rglob("escape.json"))


def test_pull_subfolder_with_dotdot_is_refused(run_main: Cli, repos: HubServer, tmp_path: Path) -> None:
    r = run_main("pull", "alice/lora", "--subfolder", "../x", "-o", str(tmp_path / "out"))
    assert_clean_error(r, "contains '..'")
    assert not (tmp_path / "out").exists()


def test_pull_force_replaces_only_an_earlier_download(run_main: Cli, repos: HubServer, tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.docx").write_bytes(b"years of work")
    before = snapshot(tmp_path / "mine")
    r = run_main("pull", "alice/lora", "-o", str(mine), "--force")
    assert_clean_error(r, "refusing to replace it", "files other than downloaded files (thesis.docx)")
    assert snapshot(tmp_path / "mine") == before
    # an earlier pull's folder is ours to replace
    out = tmp_path / "out"
    assert run_main("pull", "alice/lora", "-o", str(out)).code == 0
    r = run_main("pull", "alice/lora", "-o", str(out), "--force")
    assert r.code == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_output_inside_the_hub_cache_input_is_refused(run_main: Cli, repos: HubServer, tmp_path: Path,
                                                      hf_home: Path) -> None:
    """hf:// inputs resolve to the cache: -o there would write into (or over) cached blobs."""
    r = run_main("pull", "alice/base", "--json")
    assert r.code == 0, r.stderr
    snap = next(hf_home.rglob("snapshots")) / next(p.name for p in next(hf_home.rglob("snapshots")).iterdir())
    r = run_main("merge", "hf://alice/base", "hf://alice/lora", "-o", str(snap / "merged"))
    line = assert_clean_error(r, "is inside an input of this command")
    assert re.search(r"snapshots/[0-9a-f]{40}", line)
