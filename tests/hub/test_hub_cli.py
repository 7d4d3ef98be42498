"""`loratool pull`, `push` and hf:// inputs end to end: loratool in a subprocess, the local Hub server,
HF_ENDPOINT / a temporary HF_HOME / HF_TOKEN in the environment. run_cli fails any run whose stdout or
stderr holds a token."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ALICE, BAD, BOB, FIXTURES, Run, assert_clean_error, closed_port, fixture_files, tree_bytes
from hubserver import HubServer

Cli = Callable[..., Run]


@pytest.fixture
def repos(hub: HubServer) -> HubServer:
    hub.add_repo("alice/lora", fixture_files("peft_llama"))
    hub.add_repo("alice/base", fixture_files("base_llama"))
    hub.add_repo("alice/priv", fixture_files("peft_llama"), private=True)
    hub.add_repo("alice/gated", fixture_files("peft_llama"), gated=True)
    return hub


def test_push_then_pull_into_a_fresh_cache(run_cli: Cli, hub: HubServer, tmp_path: Path) -> None:
    r = run_cli("push", str(FIXTURES / "peft_llama"), "alice/llama-lora", "--json")
    assert r.code == 0, r.stderr
    doc = r.json()
    assert doc["card"] == "generated" and doc["created_repo"] and doc["revision"] == "main"
    assert doc["commit"] == hub.repos["alice/llama-lora"].branches["main"]
    assert doc["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    card = hub.files_at("alice/llama-lora")["README.md"]
    assert card.startswith(b'---\nbase_model: "tiny-llama"\nlibrary_name: peft\n')

    fresh = tmp_path / "fresh_home"
    r = run_cli("pull", "alice/llama-lora", home=fresh)
    assert r.code == 0, r.stderr
    path, summary = r.stdout.splitlines()
    assert Path(path).is_relative_to(fresh) and doc["commit"] in path
    got = tree_bytes(Path(path))
    assert {k: got[k] for k in fixture_files("peft_llama")} == fixture_files("peft_llama")
    assert summary.startswith("peft, 14 modules, rank 2..8") and "from alice/llama-lora@main" in summary

    out = tmp_path / "copy"
    r = run_cli("pull", "alice/llama-lora", "-o", str(out), "--json", home=fresh)
    assert r.code == 0 and r.json()["path"] == str(out) and not r.json()["in_cache"]
    assert tree_bytes(out) == {k: v for k, v in hub.files_at("alice/llama-lora").items() if k != ".gitattributes"}

    r = run_cli("push", str(FIXTURES / "peft_llama"), "alice/llama-lora")  # again: nothing to commit
    assert r.code == 0, r.stderr
    assert r.stdout.splitlines()[-1].startswith("Wrote hf://alice/llama-lora@main (2 files, existing card kept, ")
    assert "nothing changed" in r.stdout
    assert r.err_lines == ["Warning: README.md already exists on the Hub; kept it (--overwrite-card replaces it)"]


def test_inspect_hf_input(run_cli: Cli, repos: HubServer, hf_home: Path) -> None:
    r = run_cli("inspect", "hf://alice/lora", "--json")
    assert r.code == 0, r.stderr
    assert (r.json()["format"], r.json()["num_modules"]) == ("peft", 14)
    assert Path(r.json()["path"]).is_relative_to(hf_home / "hub")  # HF_HOME of the process, read at import


def test_hf_inputs_for_validate_resize_rescale(run_main: Cli, repos: HubServer, tmp_path: Path) -> None:
    # in-process: these commands import torch, which this process has already paid for
    r = run_main("validate", "hf://alice/lora", "--base", "hf://alice/base", "--json")
    assert r.code == 0, r.stderr
    assert r.json()["ok"] and r.json()["matched"] == 14

    sha = repos.repos["alice/lora"].branches["main"]
    r = run_main("resize", f"hf://alice/lora@{sha}", "-o", str(tmp_path / "r2"), "--rank", "2", "--json")
    assert r.code == 0, r.stderr
    assert max(m["new_rank"] for m in r.json()["modules"]) == 2

    # a weights file alone: its adapter_config.json comes along, so alpha is the config's, not implied
    r = run_main("rescale", "hf://alice/lora/adapter_model.safetensors", "-o", str(tmp_path / "half"),
                 "--factor", "0.5", "--json")
    assert r.code == 0, r.stderr
    assert {m["old_alpha"] for m in r.json()["modules"]} == {8, 16}


def test_hf_inputs_for_merge(run_main: Cli, repos: HubServer, tmp_path: Path) -> None:
    r = run_main("merge", "hf://alice/base", "hf://alice/lora", "-o", str(tmp_path / "merged"), "--json")
    assert r.code == 0, r.stderr
    assert tree_bytes(tmp_path / "merged")["config.json"] == fixture_files("base_llama")["config.json"]
    assert (tmp_path / "merged" / "model.safetensors.index.json").is_file()


def test_hf_inputs_for_combine(run_main: Cli, repos: HubServer, tmp_path: Path) -> None:
    r = run_main("combine", "hf://alice/lora", f"hf://alice/lora@{repos.repos['alice/lora'].branches['main']}",
                 "-w", "0.5,0.5", "--method", "cat", "-o", str(tmp_path / "both"), "--json")
    assert r.code == 0, r.stderr
    assert r.json()["num_modules"] == 14


def test_branch_with_slash_and_commit_sha(run_cli: Cli, repos: HubServer, make_adapter) -> None:  # type: ignore[no-untyped-def]
    first = repos.repos["alice/lora"].branches["main"]
    other = make_adapter(fmt="peft", rank=2)
    head = repos.commit("alice/lora", {f"exp/{k}": v for k, v in tree_bytes(other).items()}, branch="feature/r2")

    r = run_cli("pull", "alice/lora@feature/r2", "--subfolder", "exp", "--json")
    assert r.code == 0, r.stderr
    doc = r.json()
    assert doc["commit"] == head and doc["revision"] == "feature/r2" and doc["summary"]["ranks"]["max"] == 2
    assert tree_bytes(Path(doc["path"])) == tree_bytes(other)

    r = run_cli("inspect", f"hf://alice/lora@{first}", "--json")
    assert r.code == 0 and r.json()["ranks"]["max"] == 8
    r = run_cli("inspect", "hf://alice/lora@feature%2Fr2/exp", "--json")
    assert r.code == 0 and r.json()["ranks"]["max"] == 2


def test_offline_works_from_the_cache_only(run_cli: Cli, repos: HubServer) -> None:
    assert run_cli("pull", "alice/lora").code == 0
    nowhere = f"http://127.0.0.1:{closed_port()}"
    r = run_cli("inspect", "hf://alice/lora", "--json", offline=True, endpoint=nowhere)
    assert r.code == 0, r.stderr
    assert r.json()["num_modules"] == 14
    r = run_cli("inspect", "hf://alice/lora@main/adapter_model.safetensors", "--json", offline=True, endpoint=nowhere)
    assert r.code == 0 and r.json()["alpha_sources"] == {"config": 12, "pattern": 2}

    r = run_cli("inspect", "hf://alice/base", offline=True, endpoint=nowhere)
    err = assert_clean_error(r, "hf://alice/base", "not in the local Hugging Face cache", "HF_HUB_OFFLINE=1")
    assert "HF_HUB_OFFLINE" in r.err_lines[1] and err


# (arguments, token, error-line needles); every case: exit 2, one Error: line + one Hint: line.
# Signed-in cases run in-process (fast); anonymous ones in a subprocess with an empty HF_HOME.
ERRORS = {
    "not-found": (["inspect", "hf://alice/nope"], ALICE, ["hf://alice/nope", "repository not found"]),
    "private": (["pull", "alice/priv"], BOB, ["hf://alice/priv", "not found", "private"]),
    "gated": (["pull", "alice/gated"], BOB, ["hf://alice/gated", "gated", "not been granted"]),
    "bad-revision": (["pull", "alice/lora@v9"], ALICE, ["hf://alice/lora@v9", "revision not found"]),
    "bad-branch-in-url": (["inspect", "hf://alice/lora@exp%2Fnope"], ALICE, ["revision not found"]),
    "missing-file": (["inspect", "hf://alice/lora/nope.safetensors"], ALICE, ["no such file or folder"]),
    "bad-token-pull": (["pull", "alice/lora"], BAD, ["401"]),
    "bad-token-validate-base": (["validate", str(FIXTURES / "peft_llama"), "--base", "hf://alice/base"], BAD,
                                ["hf://alice/base", "401"]),
    "forbidden-push": (["push", str(FIXTURES / "peft_llama"), "alice/lora"], BOB, ["403", "alice/lora"]),
    "forbidden-namespace": (["push", str(FIXTURES / "peft_llama"), "alice/new"], BOB, ["403", "namespace"]),
    "malformed-url": (["inspect", "hf://alice"], ALICE, ["hf://alice", "not a repo id"]),
}
ANONYMOUS_ERRORS = {
    "private-anonymous": (["inspect", "hf://alice/priv"], None, ["not found", "not logged in"]),
    "gated-anonymous": (["inspect", "hf://alice/gated/adapter_config.json"], None, ["gated", "not logged in"]),
    "no-token-push": (["push", str(FIXTURES / "peft_llama"), "alice/new"], None, ["needs a Hugging Face token"]),
    "bad-token-push-argv": (["push", str(FIXTURES / "peft_llama"), "alice/lora", "--token", BAD], None, ["401"]),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_errors(case: str, run_main: Cli, repos: HubServer) -> None:
    args, token, needles = ERRORS[case]
    assert_clean_error(run_main(*args, token=token), *needles)
    assert set(repos.repos) == {"alice/lora", "alice/base", "alice/priv", "alice/gated"}  # nothing created


@pytest.mark.parametrize("case", list(ANONYMOUS_ERRORS))
def test_errors_subprocess(case: str, run_cli: Cli, repos: HubServer) -> None:
    args, token, needles = ANONYMOUS_ERRORS[case]
    assert_clean_error(run_cli(*args, token=token), *needles)
    assert set(repos.repos) == {"alice/lora", "alice/base", "alice/priv", "alice/gated"}


@pytest.mark.parametrize("args", [["inspect", "hf://alice/lora"], ["pull", "alice/lora", "--json"],
                                  ["push", str(FIXTURES / "peft_llama"), "alice/lora"]])
def test_connection_refused_fails_fast(args: list[str], run_cli: Cli) -> None:
    import time

    t = time.monotonic()
    r = run_cli(*args, endpoint=f"http://127.0.0.1:{closed_port()}")
    assert_clean_error(r, "cannot reach the Hub at http://127.0.0.1:")
    assert time.monotonic() - t < 15  # huggingface_hub's own retries would take ~20 s


def test_token_saved_by_hf_auth_login_is_used(run_cli: Cli, repos: HubServer, hf_home: Path) -> None:
    (hf_home / "token").write_text(ALICE)  # where `hf auth login` stores it ($HF_HOME/token)
    r = run_cli("pull", "alice/priv", "--json", token=None)  # private: only alice's token sees it
    assert r.code == 0, r.stderr
    assert r.json()["kind"] == "adapter"


def test_debug_traceback_never_shows_the_token(run_cli: Cli, repos: HubServer) -> None:
    r = run_cli("pull", "alice/lora", "--token", BAD, token=None, env={"LORATOOL_DEBUG": "1"})
    assert r.code == 2 and "Traceback" in r.stderr and "401" in r.stderr  # run_cli checked: no token


def test_pull_and_push_spell_revisions_alike(run_main, hub: HubServer, tmp_path: Path) -> None:
    """push takes REPO_ID@BRANCH and hf://OWNER/REPO[@BRANCH] like pull; pull takes --revision like push."""
    hub.add_repo("alice/lora", fixture_files("peft_llama"))
    llama = str(FIXTURES / "peft_llama")
    r = run_main("push", llama, "alice/lora@exp/a", "--json")
    assert r.code == 0, r.stderr
    assert r.json()["revision"] == "exp/a" and "exp/a" in hub.repos["alice/lora"].branches
    r = run_main("push", llama, "hf://alice/lora@exp%2Fb", "--json")
    assert r.code == 0, r.stderr
    assert r.json()["revision"] == "exp/b" and r.json()["repo_id"] == "alice/lora"
    r = run_main("pull", "alice/lora", "--revision", "exp/a", "--json")
    assert r.code == 0 and r.json()["revision"] == "exp/a"
    r = run_main("pull", "alice/lora@exp/a", "--revision", "main")
    assert r.code == 2 and "--revision" in r.stderr
    r = run_main("push", llama, "hf://alice/lora/sub")
    assert r.code == 2 and "folder" in r.stderr
