"""A hostile (or broken) Hub, issue 22 items 4, 5, 6, 8 and 10 (Hub part), issue 29 item 8.

The local server (hubserver.py, `hub.hostile`) lies one way per case: an ETag or a commit that is a
path out of the cache, a NUL in a sha, answers that are not JSON or have wrong types, redirect loops,
a size that does not match, a plain 404, an answer trickled one byte every 0.5 s, no answer to file
requests, the caller's token echoed back. Each case ends in one `Error:` line (exit 2) within a
wall-clock bound, and nothing changes on disk outside the repo's own part of the cache (every file
under tmp_path is hashed before and after). HF_HOME is always inside tmp_path.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from clirun import bounded
from conftest import ALICE, FIXTURES, Run, assert_clean_error, fixture_files
from hubserver import HubServer
from safetensors.torch import load_file, save_file
from test_safety import snapshot

Cli = Callable[..., Run]
BOUND_S = 30.0
CACHE = os.path.join("hf_home", "hub", "models--alice--lora") + os.sep


@pytest.fixture
def lora(hub: HubServer, hf_home: Path, tmp_path: Path) -> Iterator[HubServer]:
    assert hf_home.is_relative_to(tmp_path)  # no test writes a cache outside its own folder
    hub.add_repo("alice/lora", fixture_files("peft_llama"))
    yield hub
    assert not (tmp_path / "planted").exists() and not (tmp_path / "planted.lock").exists()


def _outside_cache(snap: dict[str, Any]) -> dict[str, Any]:
    """Everything but the repo's own cache folder and huggingface_hub's bookkeeping (.locks, CACHEDIR.TAG)."""
    hub_dir = os.path.join("hf_home", "hub")
    return {k: v for k, v in snap.items()
            if not (k.startswith(CACHE) or k == CACHE.rstrip(os.sep) or k == hub_dir
                    or k.startswith(os.path.join(hub_dir, ".locks")) or k == os.path.join(hub_dir, "CACHEDIR.TAG"))}


def _timed(run: Cli, *args: str, **kw: Any) -> tuple[Run, float]:
    start = time.monotonic()
    with bounded(BOUND_S):
        r = run(*args, **kw)
    took = time.monotonic() - start
    assert took < BOUND_S, f"{args} took {took:.1f} s"
    return r, took


# ---------------------------------------------------------------------------------------------
# item 5 and item 10 (Hub): answers that would place or read files outside the cache, or that no Hub sends

HOSTILE = {
    "etag-dotdot": ({"etag": '"../../../../planted"'}, "ETag '\"../../../../planted\"'"),
    "etag-weak-dotdot": ({"etag": 'W/"../../../../planted"'}, "which is not a plain file name"),
    "etag-absolute": ({"etag": '"/tmp/planted"'}, "which is not a plain file name"),
    "commit-dotdot": ({"commit": "../../../../planted"}, "'../../../../planted', which is not"),
    "sha-nul": ({"sha": "9f6e835c5817b660a04c4acf9b6c43425250cc0\u0000"}, "commit sha"),
    "sha-number": ({"sha": 12345}, "commit sha 12345"),
    "info-list": ({"repo_info": []}, "is a JSON list, not an object"),
    "info-string": ({"repo_info": "hello"}, "is a JSON str, not an object"),
    "siblings-string": ({"siblings": "x"}, "gives siblings as str"),
    "siblings-number-name": ({"siblings": [{"rfilename": 7}]}, "repository file name 7"),
    "siblings-dotdot": ({"siblings": [{"rfilename": "../../x.json"}]}, "'../../x.json', which contains '..'"),
    "not-json": ({"not_json": b"<html>Hub maintenance</html>"}, "is not JSON (it begins b'<html>"),
    "redirect-loop": ({"redirect_loop": True}, "redirects in a loop"),
    "size-lie": ({"size_lie": 10}, "bytes where the Hub announced"),
}


SUBPATH_HOSTILE = {
    "paths-info-object": ({"paths_info": {"path": "adapter_config.json"}}, "is a JSON dict, not a list of entries"),
    "paths-info-no-type": ({"paths_info": [{"path": "adapter_config.json", "size": 3}]}, "of type None"),
    "paths-info-dotdot": ({"paths_info": [{"type": "file", "path": "../../x", "size": 3}]}, "'../../x', which"),
    "paths-info-size-string": ({"paths_info": [{"type": "file", "path": "adapter_config.json", "size": "big"}]},
                               "as 'big', not a whole number"),
}


@pytest.mark.parametrize("case", sorted(SUBPATH_HOSTILE))
def test_hostile_listing_of_a_path_is_one_clean_error(run_main: Cli, lora: HubServer, tmp_path: Path,
                                                      case: str) -> None:
    lie, needle = SUBPATH_HOSTILE[case]
    lora.hostile.update(lie)
    before = _outside_cache(snapshot(tmp_path))
    r, _ = _timed(run_main, "inspect", "hf://alice/lora/adapter_model.safetensors")
    assert_clean_error(r, "hf://alice/lora/adapter_model.safetensors", needle)
    assert _outside_cache(snapshot(tmp_path)) == before


@pytest.mark.parametrize("command", ["pull", "inspect"])
@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_answer_is_one_clean_error(run_main: Cli, lora: HubServer, tmp_path: Path, case: str,
                                           command: str) -> None:
    lie, needle = HOSTILE[case]
    lora.hostile.update(lie)
    before = _outside_cache(snapshot(tmp_path))
    args = ("pull", "alice/lora", "-o", str(tmp_path / "out")) if command == "pull" else ("inspect", "hf://alice/lora")
    r, _ = _timed(run_main, *args)
    line = assert_clean_error(r, "hf://alice/lora", needle)
    assert "Hint: " in r.stderr
    assert not (tmp_path / "out").exists()
    assert _outside_cache(snapshot(tmp_path)) == before, line


def test_plain_404_says_the_endpoint_is_wrong(run_main: Cli, lora: HubServer, tmp_path: Path) -> None:
    """Issue 29 item 8: a wrong HF_ENDPOINT answers 404 to everything; waiting will not help."""
    lora.hostile["not_found"] = True
    r, _ = _timed(run_main, "pull", "alice/lora", "-o", str(tmp_path / "out"))
    assert_clean_error(r, "answered 404 Not Found")
    hint = r.err_lines[1]
    assert "retry later" not in hint and "HF_ENDPOINT" in hint and "repository name" in hint


def test_tampered_cache_is_not_copied_out(run_cli: Cli, lora: HubServer, tmp_path: Path, hf_home: Path) -> None:
    """A snapshot file that leads out of the cache (a planted link, or what a `..` ETag made) is never
    read or copied: pull -o from the cache refuses it (huggingface_hub itself would hand it over)."""
    assert run_cli("pull", "alice/lora").code == 0
    snap = next((hf_home / "hub" / "models--alice--lora" / "snapshots").iterdir())
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY----- planted\n")
    (snap / "adapter_config.json").unlink()
    (snap / "adapter_config.json").symlink_to(secret)
    before = snapshot(tmp_path)
    r, _ = _timed(run_cli, "pull", "alice/lora", "-o", str(tmp_path / "out"), offline=True)
    assert_clean_error(r, "adapter_config.json leads out of the Hugging Face cache", str(secret))
    assert snapshot(tmp_path) == before
    r, _ = _timed(run_cli, "inspect", "hf://alice/lora", offline=True)
    assert r.code == 2 and "leads out of the Hugging Face cache" in r.stderr


# ---------------------------------------------------------------------------------------------
# item 8 (Hub) and issue 29 item 8: deadlines


def test_trickling_hub_times_out(run_main: Cli, lora: HubServer, tmp_path: Path) -> None:
    lora.hostile["trickle"] = 0.5  # one byte every half second: never a read timeout, hours per answer
    before = _outside_cache(snapshot(tmp_path))
    r, took = _timed(run_main, "pull", "alice/lora", "-o", str(tmp_path / "out"), env={"LORATOOL_HUB_TIMEOUT": "2"})
    assert_clean_error(r, "did not answer within 2 s")
    assert took < 8, took
    assert _outside_cache(snapshot(tmp_path)) == before


@pytest.mark.parametrize("args", [("pull", "alice/lora"), ("inspect", "hf://alice/lora"),
                                  ("pull", "alice/lora", "--subfolder", "adapter_config.json")])
def test_timeout_is_honoured_not_doubled_by_retries(run_main: Cli, lora: HubServer, args: tuple[str, ...]) -> None:
    """The repo answers, its files never do: huggingface_hub's own retries (1-8 s apart) made 10 s
    into 17-20 s and more; the first request past its deadline ends the command."""
    lora.hostile["mute_files"] = 60
    r, took = _timed(run_main, *args, env={"LORATOOL_HUB_TIMEOUT": "2"})
    assert_clean_error(r, "did not answer within 2 s")
    assert took < 3 * 2, took  # before: 2 s per try, 1-8 s sleeps between 5 tries


def test_files_that_do_not_answer_come_from_the_cache(run_main: Cli, lora: HubServer, tmp_path: Path) -> None:
    """The repo answers, its files do not: what the cache holds still serves, within the deadline."""
    assert run_main("pull", "alice/lora").code == 0
    lora.hostile["mute_files"] = 60
    r, took = _timed(run_main, "pull", "alice/lora", "-o", str(tmp_path / "out"), env={"LORATOOL_HUB_TIMEOUT": "2"})
    assert r.code == 0, r.stderr
    assert took < 3 * 2, took
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


# ---------------------------------------------------------------------------------------------
# item 4 through the Hub: push never uploads what a folder only links to


def test_push_refuses_a_link_out_of_the_folder(run_main: Cli, hub: HubServer, tmp_path: Path) -> None:
    src = tmp_path / "adapter"
    shutil.copytree(FIXTURES / "peft_llama", src)
    (src / "notes.txt").symlink_to("/proc/self/environ")
    before = snapshot(tmp_path)
    r, _ = _timed(run_main, "push", str(src), "alice/new-lora")
    assert_clean_error(r, "notes.txt", "leading out of the input folder")
    assert "alice/new-lora" not in hub.repos
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# item 6: the token is never printed (stdout or stderr) nor written


def test_push_scrubs_the_commit_url_the_hub_echoes(run_cli: Cli, hub: HubServer) -> None:
    hub.hostile["echo_token"] = True
    for i, extra in enumerate(((), ("--json",))):
        r = run_cli("push", str(FIXTURES / "peft_llama"), f"alice/echo{i}", *extra)  # run_cli: no token printed
        assert r.code == 0, r.stderr
        assert "by=***" in r.stdout


def _adapter_holding(tmp_path: Path, token: str) -> Path:
    src = tmp_path / "adapter"
    shutil.copytree(FIXTURES / "peft_llama", src)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = token
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    weights = src / "adapter_model.safetensors"
    save_file(load_file(weights), weights, metadata={"note": f"made with {token}", "format": "pt"})
    return src


@pytest.mark.parametrize("token", [ALICE, "Zq9x", "töken-ünïcode-Zq9"])
def test_inspect_shows_a_token_in_metadata_redacted(run_main: Cli, hub: HubServer, tmp_path: Path,
                                                    token: str) -> None:
    src = _adapter_holding(tmp_path, token)
    for extra in ((), ("--json",), ("--json", "--modules")):
        r = run_main("inspect", str(src), *extra, token=token)
        assert r.code == 0, r.stderr
        assert token not in r.stdout + r.stderr and json.dumps(token)[1:-1] not in r.stdout
        assert "***" in r.stdout
        if "--json" in extra:
            assert json.loads(r.stdout)["base_model"] == "***"


def test_outputs_never_carry_the_token(run_main: Cli, hub: HubServer, tmp_path: Path) -> None:
    token = "Zq9x-short-token"
    src = _adapter_holding(tmp_path, token)
    base = tmp_path / "base"
    shutil.copytree(FIXTURES / "base_llama", base)
    (base / "tokenizer_config.json").write_text(json.dumps({"hub_token": token}))
    runs = [("rescale", str(src), "--factor", "2", "-o", str(tmp_path / "rescaled")),
            ("convert", str(src), "--to", "kohya", "-o", str(tmp_path / "k.safetensors")),
            ("merge", str(base), str(src), "-o", str(tmp_path / "merged"), "--report", str(tmp_path / "r.json"))]
    inputs = snapshot(src), snapshot(base)
    for args in runs:
        with bounded(BOUND_S):
            r = run_main(*args, token=token)
        assert r.code == 0, (args, r.stderr)
        assert token not in r.stdout + r.stderr
    assert "holds a Hub token" in r.stderr  # merge's copy of tokenizer_config.json
    for out in ("rescaled", "k.safetensors", "merged", "r.json"):
        root = tmp_path / out
        for f in [root] if root.is_file() else root.rglob("*"):
            if f.is_file():
                assert token.encode() not in f.read_bytes(), f
    assert json.loads((tmp_path / "merged" / "tokenizer_config.json").read_text()) == {"hub_token": "***"}
    # the inputs are untouched
    assert (snapshot(src), snapshot(base)) == inputs
    assert token.encode() in (base / "tokenizer_config.json").read_bytes()


def test_push_refuses_a_file_holding_the_token(run_main: Cli, hub: HubServer, tmp_path: Path) -> None:
    src = _adapter_holding(tmp_path, ALICE)
    r, _ = _timed(run_main, "push", str(src), "alice/leaky")
    assert_clean_error(r, "holds the Hub token in use", "refusing to upload")
    assert "alice/leaky" not in hub.repos


def test_pull_copy_of_a_file_echoing_the_token_is_scrubbed(run_main: Cli, hub: HubServer, tmp_path: Path) -> None:
    files = fixture_files("peft_llama")
    files["notes.txt"] = f"uploaded by {ALICE}\n".encode()
    hub.add_repo("alice/echo", files)
    r = run_main("pull", "alice/echo", "-o", str(tmp_path / "out"))
    assert r.code == 0, r.stderr
    assert (tmp_path / "out" / "notes.txt").read_text() == "uploaded by ***\n"
