"""Links out of an input folder are never followed (issue 22 item 4).

A file of an input folder that resolves outside it (a symbolic link to /proc/self/environ, /dev/zero,
someone else's file, a folder elsewhere) is refused, naming the file, where it is read as data
(weights, configs, indexes), and skipped with one warning where it would only be copied (merge's
copy of tokenizer and other side files). Links that stay inside the folder keep working.

Every case snapshots the whole tree (sha256 of every file, link targets) before and after, and has a
wall-clock bound: a link to /dev/zero must be refused, not read until memory runs out.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from clirun import bounded, run_cli
from test_safety import snapshot

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "fixtures"
BOUND_S = 60.0  # generous for a busy 2-core machine; a hang would be unbounded
MARKER = "LORATOOL_LINK_TEST_SECRET_4f1c"


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path with a copy of the llama base and adapter, a secret file outside both, and the marker
    in this process's environment (what /proc/self/environ would give away)."""
    shutil.copytree(FIXTURES / "base_llama", tmp_path / "base")
    shutil.copytree(FIXTURES / "peft_llama", tmp_path / "adapter")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "id_rsa").write_text(f"-----BEGIN KEY----- {MARKER}\n")
    monkeypatch.setenv("LORATOOL_LINK_MARKER", MARKER)
    return tmp_path


def _run(*args: object) -> tuple[int, str, str]:
    start = time.monotonic()
    with bounded(BOUND_S):
        r = run_cli(args)
    assert time.monotonic() - start < BOUND_S, f"{args} took too long"
    assert "Traceback" not in r.err
    return r.code, r.out, r.err


def _refused(args: tuple[object, ...], *needles: str) -> str:
    code, out, err = _run(*args)
    assert code == 2, (code, out, err)
    lines = [x for x in err.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("Error: ")]
    assert len(errors) == 1, err
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def _no_marker_under(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            assert MARKER.encode() not in p.read_bytes(), p


def _unchanged_but(before: dict, after: dict, out: str) -> None:
    keep = {k for k in before.keys() | after.keys() if not (k == out or k.startswith(out + os.sep))}
    assert {k: before.get(k) for k in keep} == {k: after.get(k) for k in keep}


# ---------------------------------------------------------------------------------------------
# plain copies: skipped with a warning, the merge still succeeds


@pytest.mark.parametrize("target", ["/proc/self/environ", "outside/id_rsa", "/dev/zero"])
def test_merge_skips_a_side_file_linking_out(world: Path, target: str) -> None:
    link = world / "base" / "tokenizer.json"
    link.symlink_to(target if target.startswith("/") else world / target)
    before = snapshot(world)
    code, _, err = _run("merge", world / "base", world / "adapter", "-o", world / "merged")
    assert code == 0, err
    assert "tokenizer.json" in err and "leading out of the input folder" in err and "not copied" in err
    assert not (world / "merged" / "tokenizer.json").exists()
    assert (world / "merged" / "config.json").is_file()
    _no_marker_under(world / "merged")
    _unchanged_but(before, snapshot(world), "merged")


def test_merge_skips_a_folder_linking_out_and_keeps_links_inside(world: Path) -> None:
    (world / "base" / "sub").mkdir()
    (world / "base" / "sub" / "tokenizer.json").write_text('{"inside": true}')
    (world / "base" / "tokenizer.json").symlink_to("sub/tokenizer.json")  # stays inside: followed
    (world / "base" / "elsewhere").symlink_to(world / "outside", target_is_directory=True)
    before = snapshot(world)
    code, _, err = _run("merge", world / "base", world / "adapter", "-o", world / "merged")
    assert code == 0, err
    assert "elsewhere" in err
    assert (world / "merged" / "tokenizer.json").read_text() == '{"inside": true}'
    assert not (world / "merged" / "elsewhere").exists()
    _no_marker_under(world / "merged")
    _unchanged_but(before, snapshot(world), "merged")


# ---------------------------------------------------------------------------------------------
# reads as data: refused, naming the file


@pytest.mark.parametrize("name", ["model-00001-of-00002.safetensors", "model.safetensors.index.json",
                                  "config.json"])
def test_merge_refuses_a_base_file_read_as_data_linking_out(world: Path, name: str) -> None:
    real = world / "outside" / name
    shutil.move(world / "base" / name, real)
    (world / "base" / name).symlink_to(real)
    before = snapshot(world)
    _refused(("merge", world / "base", world / "adapter", "-o", world / "merged"), name, "leading out of")
    assert snapshot(world) == before


@pytest.mark.parametrize("command", [["inspect"], ["validate"], ["rescale", "--factor", "2", "-o", "{out}"],
                                     ["convert", "--to", "kohya", "-o", "{out}.safetensors"]])
@pytest.mark.parametrize("name,target", [("adapter_config.json", "/proc/self/environ"),
                                         ("adapter_config.json", "/dev/zero"),
                                         ("adapter_model.safetensors", "outside/adapter_model.safetensors")])
def test_adapter_folder_file_linking_out_is_refused(world: Path, command: list[str], name: str,
                                                    target: str) -> None:
    if not target.startswith("/"):
        shutil.copy(world / "adapter" / name, world / target)
    (world / "adapter" / name).unlink()
    (world / "adapter" / name).symlink_to(target if target.startswith("/") else world / target)
    before = snapshot(world)
    args = [a.replace("{out}", str(world / "out")) for a in command]
    line = _refused((args[0], world / "adapter", *args[1:]), name, "leading out of the input folder")
    assert MARKER not in line
    assert snapshot(world) == before


def test_single_file_base_folder_linking_out_is_refused(world: Path) -> None:
    base = world / "base1"
    base.mkdir()
    (base / "model.safetensors").symlink_to("/dev/zero")
    before = snapshot(world)
    _refused(("merge", base, world / "adapter", "-o", world / "merged"), "model.safetensors", "leading out of")
    assert snapshot(world) == before


def test_a_link_to_the_folder_itself_is_fine(world: Path) -> None:
    """The input path may itself be a link (a user's own shortcut): only links out of it are refused."""
    (world / "shortcut").symlink_to(world / "adapter", target_is_directory=True)
    code, _, err = _run("inspect", world / "shortcut", "--json")
    assert code == 0, err


def test_library_folder_file_and_copy_tree(tmp_path: Path) -> None:
    from loratool.errors import FormatError
    from loratool.io.copies import copy_tree_files
    from loratool.io.paths import folder_file, leads_out

    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.json").write_text("{}")
    (root / "in.json").symlink_to("a/x.json")
    (root / "out.json").symlink_to("/proc/self/environ")
    (root / "etc").symlink_to("/etc", target_is_directory=True)
    assert leads_out(root / "in.json", root) is None
    assert leads_out(root / "missing.json", root) is None
    assert leads_out(root / "out.json", root) is not None
    assert leads_out(root / "etc", root) == os.path.realpath("/etc")
    assert folder_file(root, "in.json") == root / "in.json"
    with pytest.raises(FormatError, match=r"out\.json: is a symbolic link leading out of the input folder"):
        folder_file(root, "out.json")
    with pytest.warns(Warning, match=r"not copied: 2 symbolic link\(s\)"):
        got = sorted(rel.as_posix() for _, rel in copy_tree_files(root))
    assert got == ["a/x.json", "in.json"]
    with pytest.raises(FormatError, match="etc: is a symbolic link leading out"):
        list(copy_tree_files(root, refuse_links_out=True))
    (root / "dangling").symlink_to(tmp_path / "nowhere")  # broken, wherever it points: an error, as before
    with pytest.raises(FormatError, match="dangling: broken symbolic link"):
        list(copy_tree_files(root))
