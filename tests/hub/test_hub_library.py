"""loratool.hub against the local Hub server, in-process: endpoint, cache_dir and token passed explicitly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ALICE, BAD, BOB, CAROL, FIXTURES, SECRETS, closed_port, fixture_files, tree_bytes
from hubserver import HubServer

from loratool import hub as lh
from loratool.errors import HubError, OutputExistsError
from loratool.ops import describe as od  # pull, push and describe with the adapter summary


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def _push(hub: HubServer, path: Path | str, repo_id: str, **kw):  # type: ignore[no-untyped-def]
    kw.setdefault("token", ALICE)
    return od.push(path, repo_id, endpoint=hub.url, **kw)


def _pull(hub: HubServer, cache: Path, repo_id: str, revision: str | None = None, **kw):  # type: ignore[no-untyped-def]
    kw.setdefault("token", ALICE)
    return od.pull(repo_id, revision, endpoint=hub.url, cache_dir=cache, **kw)


# ---------------------------------------------------------------------------------------------
# hf:// URLs


@pytest.mark.parametrize(("url", "repo_id", "revision", "path"), [
    ("hf://me/lora", "me/lora", None, ""),
    ("hf://me/lora/", "me/lora", None, ""),
    ("hf://me/lora@v2", "me/lora", "v2", ""),
    ("hf://me/lora@v2/style/adapter_model.safetensors", "me/lora", "v2", "style/adapter_model.safetensors"),
    ("hf://me/lora@exp%2Frank16/style", "me/lora", "exp/rank16", "style"),
    ("hf://me/lora@refs/pr/3/a.safetensors", "me/lora", "refs/pr/3", "a.safetensors"),
    ("hf://models/me/lora@" + "a" * 40, "me/lora", "a" * 40, ""),
    ("hf://Org-1/my_lora.v2/sub", "Org-1/my_lora.v2", None, "sub"),
])
def test_parse_hf_url(url: str, repo_id: str, revision: str | None, path: str) -> None:
    u = lh.parse_hf_url(url)
    assert (u.repo_id, u.revision, u.path) == (repo_id, revision, path)
    assert lh.parse_hf_url(str(u)) == u  # the canonical form reads back the same


@pytest.mark.parametrize("url", [
    "hf://me", "hf://me/", "hf:///lora", "hf://me/lo--ra", "hf://me/lora@", "hf://me/lora@/x",
    "hf://datasets/me/data", "hf://me/lora/../x", "hf://me/lo ra", "me/lora",
])
def test_parse_hf_url_refuses(url: str) -> None:
    with pytest.raises(HubError) as e:
        lh.parse_hf_url(url)
    assert e.value.hint


def test_plain_paths_pass_through_untouched(tmp_path: Path) -> None:
    assert lh.resolve_path(str(tmp_path / "x")) == tmp_path / "x"
    assert lh.resolve_path("relative/dir") == Path("relative/dir")


# ---------------------------------------------------------------------------------------------
# push / pull


def test_push_then_pull_into_a_fresh_cache_gives_identical_bytes(hub: HubServer, cache: Path) -> None:
    r = _push(hub, FIXTURES / "peft_llama", "alice/llama-lora")
    assert (r.repo_id, r.revision, r.card, r.created_repo, r.changed) == ("alice/llama-lora", "main", "generated",
                                                                          True, True)
    on_hub = hub.files_at("alice/llama-lora")
    assert r.commit == hub.repos["alice/llama-lora"].branches["main"]
    local = fixture_files("peft_llama")
    assert {k: on_hub[k] for k in local} == local
    assert sorted(r.files) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]

    p = _pull(hub, cache, "alice/llama-lora")
    assert p.commit == r.commit and p.cached_only
    assert str(p.path).startswith(str(cache))
    got = tree_bytes(p.path)
    assert {k: got[k] for k in local} == local
    assert got["README.md"] == on_hub["README.md"]
    assert p.described.kind == "adapter" and p.described.summary["num_modules"] == 14
    # one commit for the whole upload: initial commit + ours
    assert len(hub.repos["alice/llama-lora"].commits) == 2


def test_push_unchanged_files_makes_no_commit(hub: HubServer) -> None:
    first = _push(hub, FIXTURES / "peft_llama", "alice/x")
    again = _push(hub, FIXTURES / "peft_llama", "alice/x")
    assert again.card == "kept" and not again.changed and again.commit == first.commit
    assert len(hub.repos["alice/x"].commits) == 2


def test_push_name_without_owner_goes_to_the_token_owner(hub: HubServer) -> None:
    r = _push(hub, FIXTURES / "peft_llama", "my-lora", token=BOB)
    assert r.repo_id == "bob/my-lora" and hub.repos["bob/my-lora"].owner == "bob"


def test_push_private_repo_is_invisible_to_others(hub: HubServer, cache: Path) -> None:
    _push(hub, FIXTURES / "peft_llama", "alice/secret", private=True)
    assert hub.repos["alice/secret"].private
    assert _pull(hub, cache, "alice/secret").described.kind == "adapter"
    with pytest.raises(HubError, match="repository not found"):
        _pull(hub, cache / "bob", "alice/secret", token=BOB)


def test_push_private_flag_on_existing_public_repo_warns(hub: HubServer) -> None:
    hub.add_repo("alice/pub", {"a.txt": b"x"})
    r = _push(hub, FIXTURES / "peft_llama", "alice/pub", private=True)
    assert not hub.repos["alice/pub"].private
    assert any("public" in w for w in r.warnings)


def test_generated_card(hub: HubServer, make_adapter, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from huggingface_hub import ModelCard

    from loratool.ops.rescale import rescale

    src = make_adapter(fmt="peft", rank=4, alpha=8, config={"base_model_name_or_path": "meta-llama/Llama-3.2-1B"})
    out = tmp_path / "half"
    rescale(src, out, mode="factor", value=0.5)
    r = _push(hub, out, "alice/half-lora", message="half strength")
    assert r.card == "generated"
    text = hub.files_at("alice/half-lora")["README.md"].decode()
    assert hub.validated_yaml == [text]  # huggingface_hub had the Hub validate the front matter

    card = ModelCard(text)
    assert card.data.base_model == "meta-llama/Llama-3.2-1B"
    assert card.data.library_name == "peft"
    assert {"lora", "loratool"} <= set(card.data.tags)
    body = card.text
    for needle in ("| format | peft |", "| modules | 3 |", "| rank | 4 |", "q_proj", "v_proj", "down_proj",
                   "| alpha | 4; from config |", "## Provenance", "`loratool rescale`", '"mode": "factor"',
                   '"value": 0.5',
                   "adapter_model.safetensors`: `", 'PeftModel.from_pretrained(base, "alice/half-lora")',
                   'AutoModelForCausalLM.from_pretrained("meta-llama/Llama-3.2-1B")'):
        assert needle in body, needle
    assert str(tmp_path) not in text  # source paths are reduced to file names
    commits = hub.repos["alice/half-lora"].commits
    assert commits[r.commit].message == "half strength"


def test_card_for_kohya_file_and_local_base_path(hub: HubServer, make_adapter) -> None:  # type: ignore[no-untyped-def]
    from huggingface_hub import ModelCard

    single = _push(hub, FIXTURES / "kohya_sd.safetensors", "alice/sd-style")
    assert single.files == ["README.md", "kohya_sd.safetensors"]
    card = ModelCard(hub.files_at("alice/sd-style")["README.md"].decode())
    assert card.data.library_name is None and "lora" in card.data.tags
    assert 'weight_name="kohya_sd.safetensors"' in card.text and "| format | kohya |" in card.text

    local_base = make_adapter(fmt="peft", config={"base_model_name_or_path": "/home/me/models/llama"})
    _push(hub, local_base, "alice/local-base")
    card = ModelCard(hub.files_at("alice/local-base")["README.md"].decode())
    assert card.data.base_model is None  # a local path is no Hub model id (the Hub would refuse the card)
    assert "/home/me/models/llama" in card.text


def test_existing_readme_is_kept_unless_overwrite_card(hub: HubServer) -> None:
    hub.add_repo("alice/x", {"README.md": b"# my own card\n"})
    kept = _push(hub, FIXTURES / "peft_llama", "alice/x")
    assert kept.card == "kept" and "README.md" not in kept.files
    assert hub.files_at("alice/x")["README.md"] == b"# my own card\n"
    assert any("--overwrite-card" in w for w in kept.warnings)
    replaced = _push(hub, FIXTURES / "peft_llama", "alice/x", overwrite_card=True)
    assert replaced.card == "replaced"
    assert hub.files_at("alice/x")["README.md"].startswith(b'---\nbase_model: "tiny-llama"\nlibrary_name: peft\n')


def test_readme_among_the_files_is_uploaded_as_is(hub: HubServer, tmp_path: Path) -> None:
    import shutil

    src = tmp_path / "a"
    shutil.copytree(FIXTURES / "peft_llama", src)
    (src / "README.md").write_text("---\nlicense: mit\n---\n# mine\n")
    (src / ".cache").mkdir()
    (src / ".cache" / "junk").write_text("x")
    r = _push(hub, src, "alice/y")
    assert r.card == "uploaded"
    files = hub.files_at("alice/y")
    assert files["README.md"] == b"---\nlicense: mit\n---\n# mine\n"
    assert not any(p.startswith(".cache") for p in files)


def test_push_to_new_branch_with_slash_then_pull_it(hub: HubServer, cache: Path, make_adapter) -> None:  # type: ignore[no-untyped-def]
    _push(hub, FIXTURES / "peft_llama", "alice/lora")
    main_before = hub.files_at("alice/lora")
    other = make_adapter(fmt="peft", rank=2, seed=7)
    r = _push(hub, other, "alice/lora", revision="exp/rank2")
    assert r.created_branch and r.revision == "exp/rank2" and r.changed
    assert hub.files_at("alice/lora") == main_before  # main untouched
    assert hub.files_at("alice/lora", "exp/rank2")["adapter_model.safetensors"] == \
        (other / "adapter_model.safetensors").read_bytes()

    p = _pull(hub, cache, "alice/lora", "exp/rank2")
    assert p.commit == r.commit and p.described.summary["ranks"]["max"] == 2
    f = lh.resolve_path("hf://alice/lora@exp%2Frank2/adapter_model.safetensors", token=ALICE, endpoint=hub.url,
                        cache_dir=cache)
    assert f.read_bytes() == (other / "adapter_model.safetensors").read_bytes()

    again = _push(hub, FIXTURES / "peft_llama", "alice/lora", revision="exp/rank2")  # branch exists now
    assert not again.created_branch and again.changed


def test_pull_a_commit_sha_gets_that_commit(hub: HubServer, cache: Path) -> None:
    v1 = hub.add_repo("alice/v", {"adapter_model.safetensors": (FIXTURES / "peft_llama/adapter_model.safetensors")
                                  .read_bytes(), "adapter_config.json": b'{"r": 4}'})
    hub.commit("alice/v", {"adapter_config.json": b'{"r": 8}'})
    old = lh.resolve_path(f"hf://alice/v@{v1}/adapter_config.json", token=ALICE, endpoint=hub.url, cache_dir=cache)
    assert old.read_bytes() == b'{"r": 4}'
    new = _pull(hub, cache, "alice/v")
    assert (new.path / "adapter_config.json").read_bytes() == b'{"r": 8}'
    assert _pull(hub, cache, "alice/v", v1).commit == v1


def test_subfolder_and_single_file(hub: HubServer, cache: Path) -> None:
    files = {f"style/{k}": v for k, v in fixture_files("peft_llama").items()}
    files |= {f"char/{k}": v for k, v in fixture_files("peft_gpt2").items()}
    files["big.bin"] = b"\0" * 10
    hub.add_repo("alice/multi", files)
    style = lh.resolve_path("hf://alice/multi/style", token=ALICE, endpoint=hub.url, cache_dir=cache)
    assert style.name == "style" and tree_bytes(style) == fixture_files("peft_llama")
    assert not (style.parent / "char").exists()  # only the folder asked for was downloaded
    assert not (style.parent / "big.bin").exists()

    weights = lh.resolve_path("hf://alice/multi/char/adapter_model.safetensors", token=ALICE, endpoint=hub.url,
                              cache_dir=cache / "2")
    assert weights.read_bytes() == fixture_files("peft_gpt2")["adapter_model.safetensors"]
    # the PEFT config beside the weights came too, so alpha is read from it, not implied
    assert (weights.parent / "adapter_config.json").is_file()
    assert set(od.describe(weights).summary["alpha_sources"]) == {"config"}

    sub = _pull(hub, cache / "3", "alice/multi", subfolder="char")
    assert sub.subfolder == "char" and sub.files == ["char/adapter_config.json", "char/adapter_model.safetensors"]


def test_pull_out_dir_copies_real_files_atomically(hub: HubServer, cache: Path, tmp_path: Path) -> None:
    hub.add_repo("alice/lora", fixture_files("peft_llama"))
    out = tmp_path / "copy"
    p = _pull(hub, cache, "alice/lora", out_dir=out)
    assert p.path == out and not p.cached_only
    assert tree_bytes(out) == fixture_files("peft_llama")
    assert not any(f.is_symlink() for f in out.rglob("*"))
    assert not (out / ".cache").exists()
    with pytest.raises(OutputExistsError):
        _pull(hub, cache, "alice/lora", out_dir=out)
    _pull(hub, cache, "alice/lora", out_dir=out, force=True)


def test_pull_base_model_is_described_as_checkpoint(hub: HubServer, cache: Path) -> None:
    hub.add_repo("alice/base", {**fixture_files("base_llama"), "pytorch_model.bin": b"pickle", "run.py": b"x"})
    p = _pull(hub, cache, "alice/base")
    assert p.described.kind == "checkpoint" and p.described.summary["num_files"] == 2
    assert "pytorch_model.bin" not in p.files and "run.py" not in p.files  # no pickles, no code


def test_pickles_only_when_there_is_no_safetensors(hub: HubServer, cache: Path) -> None:
    hub.add_repo("alice/old", {"adapter_config.json": b"{}", "adapter_model.bin": b"pickle"})
    p = _pull(hub, cache, "alice/old")
    assert "adapter_model.bin" in p.files


def test_repo_without_adapter_or_model_files(hub: HubServer, cache: Path) -> None:
    hub.add_repo("alice/gguf", {"model.gguf": b"GGUF"})
    e = _error(_pull, hub, cache, "alice/gguf")
    assert "no adapter or model files" in e.message


# ---------------------------------------------------------------------------------------------
# failures: each is a HubError naming the repo, with a hint, never the token


def _error(fn, *args, **kw) -> HubError:  # type: ignore[no-untyped-def]
    with pytest.raises(HubError) as e:
        fn(*args, **kw)
    err = e.value
    assert err.hint, err.message
    for s in SECRETS:
        assert s not in err.message and s not in err.hint
    return err


def test_errors(hub: HubServer, cache: Path) -> None:
    hub.add_repo("alice/lora", fixture_files("peft_llama"))
    hub.add_repo("alice/priv", fixture_files("peft_llama"), private=True)
    hub.add_repo("alice/gated", fixture_files("peft_llama"), gated=True, granted={"carol"})
    url = hub.url

    def resolve(path: str, token: str | None = ALICE, **kw):  # type: ignore[no-untyped-def]
        return lh.resolve_path(path, token=token, endpoint=kw.pop("endpoint", url), cache_dir=cache, **kw)

    assert "repository not found" in _error(resolve, "hf://alice/nope").message
    e = _error(resolve, "hf://alice/priv", token=BOB)
    assert "hf://alice/priv" in e.message and "private" in e.message
    e = _error(resolve, "hf://alice/gated", token=BOB)
    assert "gated" in e.message and f"{url}/alice/gated" in e.hint
    assert resolve("hf://alice/gated", token=CAROL).is_dir()  # granted
    e = _error(resolve, "hf://alice/lora@nope")
    assert "revision not found" in e.message and "hf://alice/lora@nope" in e.message
    e = _error(resolve, "hf://alice/lora/missing.safetensors")
    assert "no such file or folder" in e.message and "tree/main" in e.hint
    e = _error(resolve, "hf://alice/lora", token=BAD)
    assert "401" in e.message and "invalid or expired" in e.hint
    e = _error(resolve, "hf://alice/lora", endpoint=f"http://127.0.0.1:{closed_port()}")
    assert "cannot reach the Hub" in e.message

    e = _error(_push, hub, FIXTURES / "peft_llama", "alice/lora", token=BOB)
    assert "403" in e.message and "alice/lora" in e.message and "write access" in e.hint
    e = _error(_push, hub, FIXTURES / "peft_llama", "alice/new", token=BOB)  # someone else's namespace
    assert "403" in e.message
    e = _error(_push, hub, FIXTURES / "peft_llama", "alice/lora", token=BAD)
    assert "401" in e.message
    e = _error(od.push, FIXTURES / "peft_llama", "alice/lora", token=ALICE,
               endpoint=f"http://127.0.0.1:{closed_port()}")
    assert "cannot reach the Hub" in e.message
    assert set(hub.repos) == {"alice/lora", "alice/priv", "alice/gated"}  # nothing was created


def test_token_quoted_by_the_server_is_scrubbed(hub: HubServer) -> None:
    hub.add_repo("alice/lora", fixture_files("peft_llama"))
    hub.echo_tokens = True
    e = _error(_push, hub, FIXTURES / "peft_llama", "alice/lora", token=BOB)  # _error: no token in message/hint
    assert "403" in e.message and "***" in e.message
    hub.users["not-even-hf-shaped-secret"] = "bob"
    e = _error(_push, hub, FIXTURES / "peft_llama", "alice/lora", token="not-even-hf-shaped-secret")
    assert "403" in e.message and "***" in e.message and "not-even-hf-shaped-secret" not in e.message + e.hint


def test_offline_uses_the_cache_only(hub: HubServer, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.add_repo("alice/lora", fixture_files("peft_llama"))
    online = lh.resolve_path("hf://alice/lora", token=ALICE, endpoint=hub.url, cache_dir=cache)
    one = lh.resolve_path("hf://alice/lora/adapter_config.json", token=ALICE, endpoint=hub.url, cache_dir=cache)
    hub.stop()  # nothing to talk to any more
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert lh.resolve_path("hf://alice/lora", token=ALICE, endpoint=hub.url, cache_dir=cache) == online
    assert lh.resolve_path("hf://alice/lora@main/adapter_config.json", token=ALICE, endpoint=hub.url,
                           cache_dir=cache) == one
    e = _error(lh.resolve_path, "hf://alice/other", token=ALICE, endpoint=hub.url, cache_dir=cache)
    assert "HF_HUB_OFFLINE=1" in e.message
    e = _error(lh.resolve_path, "hf://alice/lora/nothere", token=ALICE, endpoint=hub.url, cache_dir=cache)
    assert "not in the local" in e.message
    e = _error(od.push, FIXTURES / "peft_llama", "alice/lora", token=ALICE, endpoint=hub.url)
    assert "forbids uploading" in e.message


def test_unreachable_hub_falls_back_to_the_cache(hub: HubServer, cache: Path) -> None:
    hub.add_repo("alice/lora", fixture_files("peft_llama"))
    online = lh.resolve_path("hf://alice/lora", token=ALICE, endpoint=hub.url, cache_dir=cache)
    down = f"http://127.0.0.1:{closed_port()}"
    assert lh.resolve_path("hf://alice/lora", token=ALICE, endpoint=down, cache_dir=cache) == online
    e = _error(lh.resolve_path, "hf://alice/lora@dev", token=ALICE, endpoint=down, cache_dir=cache)
    assert "cannot reach the Hub" in e.message


def test_push_refuses_unreadable_adapters_before_any_request(hub: HubServer, tmp_path: Path) -> None:
    from loratool.errors import FormatError

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"r": 4}))
    (bad / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(FormatError):
        _push(hub, bad, "alice/bad")
    with pytest.raises(FormatError):
        _push(hub, tmp_path / "missing", "alice/bad")
    assert hub.requests == []


# ---------------------------------------------------------------------------------------------
# cards the Hub accepts


@pytest.mark.parametrize("base", ["gpt2", "bert-base-uncased", "openai-community/gpt2"])
def test_base_model_without_owner_goes_into_the_card(hub: HubServer, make_adapter, base: str) -> None:  # type: ignore[no-untyped-def]
    from huggingface_hub import ModelCard

    src = make_adapter(fmt="peft", config={"base_model_name_or_path": base})
    _push(hub, src, "alice/owned")
    card = ModelCard(hub.files_at("alice/owned")["README.md"].decode())
    assert card.data.base_model == base


def _save_pretrained_folder(tmp_path: Path) -> Path:
    """What peft's save_pretrained writes for a model loaded from a local directory: its README
    front matter says `base_model: ''` (and library_name: peft), which the Hub refuses."""
    import shutil

    d = tmp_path / "sp"
    shutil.copytree(FIXTURES / "peft_llama", d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = ""
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    (d / "README.md").write_text("---\nbase_model: ''\nlibrary_name: peft\n---\n\n# Model Card for Model ID\n\nbody\n")
    return d


def test_the_test_hub_refuses_empty_base_model_like_the_hub(hub: HubServer, tmp_path: Path) -> None:
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.url, token=ALICE)
    api.create_repo("alice/raw")
    with pytest.raises(ValueError, match="base_model"):
        api.upload_file(path_or_fileobj=b"---\nbase_model: ''\n---\nx\n", path_in_repo="README.md", repo_id="alice/raw")
    with pytest.raises(ValueError, match="base_model"):
        api.upload_file(path_or_fileobj=b"---\nbase_model: /home/me/llama\n---\nx\n", path_in_repo="README.md",
                        repo_id="alice/raw")
    api.upload_file(path_or_fileobj=b"---\nbase_model: gpt2\n---\nx\n", path_in_repo="README.md", repo_id="alice/raw")


def test_save_pretrained_readme_with_empty_base_model_is_fixed(hub: HubServer, tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    d = _save_pretrained_folder(tmp_path)
    before = (d / "README.md").read_bytes()
    r = _push(hub, d, "alice/sp")
    assert r.card == "fixed" and any("base_model" in w for w in r.warnings)
    card = ModelCard(hub.files_at("alice/sp")["README.md"].decode())
    assert card.data.base_model is None and card.data.library_name == "peft"
    assert card.text.strip().endswith("body")
    assert (d / "README.md").read_bytes() == before  # the input is never modified

    r = _push(hub, d, "alice/sp2", base_model="meta-llama/Llama-3.2-1B")
    card = ModelCard(hub.files_at("alice/sp2")["README.md"].decode())
    assert r.card == "fixed" and card.data.base_model == "meta-llama/Llama-3.2-1B"


def test_base_model_option_writes_a_valid_card(hub: HubServer) -> None:
    from huggingface_hub import ModelCard

    _push(hub, FIXTURES / "peft_llama", "alice/with-base", base_model="gpt2")
    card = ModelCard(hub.files_at("alice/with-base")["README.md"].decode())
    assert card.data.base_model == "gpt2" and 'from_pretrained("gpt2")' in card.text
    with pytest.raises(HubError, match="--base-model"):
        _push(hub, FIXTURES / "peft_llama", "alice/bad", base_model="")
    with pytest.raises(HubError, match="--base-model"):
        _push(hub, FIXTURES / "peft_llama", "alice/bad", base_model="/tmp/x")
