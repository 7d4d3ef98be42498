"""Never destroy what isn't ours (issue #12): a hostile-input corpus, generated at test time.

Every case builds a small world under tmp_path (inputs, earlier outputs, unrelated files, links,
FIFOs), snapshots the whole tree (file bytes, link targets, special files), runs one loratool
command in this process (loratool.cli.main) and checks:

- the exit code, and for a refusal exactly one `Error:` line matching the case's pattern and no
  traceback;
- that nothing changed except below the output path (every input is byte-identical; for a
  refusal nothing changed at all).

The interrupt and concurrency tests live in tests/test_safety_signals.py (they need processes).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from clirun import bounded
from factories import build_adapter, build_base
from safetensors.torch import save_file

from loratool.cli import main

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "fixtures"

# ---------------------------------------------------------------------------------------------
# the harness


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under root, links not followed: files by sha256, links by target, specials by type."""
    snap: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            mode = os.lstat(p).st_mode
            if stat.S_ISLNK(mode):
                snap[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(mode):
                snap[rel] = ("dir",)
            elif stat.S_ISREG(mode):
                with open(p, "rb") as f:
                    snap[rel] = ("file", hashlib.sha256(f.read()).hexdigest())
            else:
                snap[rel] = ("special", stat.S_IFMT(mode))
    return snap


def run(capsys: pytest.CaptureFixture[str], args: list[Any]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("Error:")]


@dataclass
class Case:
    args: list[Any]
    code: int
    message: str  # regex: the Error: line (exit 2) or stdout (exit 1)
    out: Path | None = None  # the only place that may change (exit 0)
    cwd: Path | None = None
    not_in_err: str | None = None
    after: Callable[[], None] | None = None  # extra checks once the command ran


def registry(cases: dict[str, Callable[[Path], Case]]) -> Callable[[Callable[[Path], Case]], Callable[[Path], Case]]:
    """A decorator adding `case_some_name` to `cases` as "some-name"."""
    def case(fn: Callable[[Path], Case]) -> Callable[[Path], Case]:
        cases[fn.__name__.removeprefix("case_").replace("_", "-")] = fn
        return fn
    return case


CASES: dict[str, Callable[[Path], Case]] = {}
case = registry(CASES)

BOUND = 120  # seconds one case may take (a hang fails the case instead of the whole run)


# ---------------------------------------------------------------------------------------------
# builders (independent of loratool's writer)

SHAPES = {
    "model.layers.0.self_attn.q_proj.weight": (16, 16),
    "model.layers.0.self_attn.v_proj.weight": (8, 16),
    "model.layers.0.mlp.down_proj.weight": (16, 24),
    "model.norm.weight": (16,),
}
MODULES = {
    "model.layers.0.self_attn.q_proj": (16, 16),
    "model.layers.0.self_attn.v_proj": (8, 16),
    "model.layers.0.mlp.down_proj": (16, 24),
}


def sharded_base(w: Path, name: str = "base") -> Path:
    base = build_base(w, SHAPES, layout="sharded", name=name)
    (base / "config.json").write_text('{"model_type": "llama"}\n')
    return base


def peft(w: Path, name: str = "adapter", **kwargs: Any) -> Path:
    return build_adapter(w, fmt="peft", modules=MODULES, name=name, **kwargs)


def kohya(w: Path, name: str = "lora.safetensors", **kwargs: Any) -> Path:
    return build_adapter(w, fmt="kohya", name=name, **kwargs)


def index_of(base: Path) -> dict[str, Any]:
    return json.loads((base / "model.safetensors.index.json").read_text())


def set_index(base: Path, index: dict[str, Any] | str) -> None:
    text = index if isinstance(index, str) else json.dumps(index, indent=2)
    (base / "model.safetensors.index.json").write_text(text)


def raw_safetensors(path: Path, header: dict[str, Any] | str, data: bytes) -> Path:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


KOHYA_KEYS = ("lora_unet_a_proj.lora_down.weight", "lora_unet_a_proj.lora_up.weight")


def kohya_raw(path: Path, down_off: list[int], up_off: list[int], data_len: int, *,
              header_text: str | None = None) -> Path:
    """A 2-module-tensor kohya file (down (2, 4), up (4, 2) float32, 32 bytes each) with chosen offsets."""
    header = {KOHYA_KEYS[0]: {"dtype": "F32", "shape": [2, 4], "data_offsets": down_off},
              KOHYA_KEYS[1]: {"dtype": "F32", "shape": [4, 2], "data_offsets": up_off}}
    data = struct.pack(f"<{data_len // 4}f", *[0.125 * (i + 1) for i in range(data_len // 4)])
    return raw_safetensors(path, header_text or header, data)


# ---------------------------------------------------------------------------------------------
# 1. names from files must stay inside their folder


@case
def case_index_dotdot(w: Path) -> Case:
    base = sharded_base(w)
    shared = w / "shared"
    shared.mkdir()
    first = "model-00001-of-00002.safetensors"
    (base / first).rename(shared / first)
    index = index_of(base)
    index["weight_map"] = {k: (f"../shared/{first}" if v == first else v) for k, v in index["weight_map"].items()}
    set_index(base, index)
    return Case(["merge", base, peft(w), "-o", w / "out"], 2, r"index\.json: file name '\.\./shared/model-00001.*"
                r"contains '\.\.'")


@case
def case_index_dotdot_validate(w: Path) -> Case:
    c = CASES["index-dotdot"](w)
    return Case(["validate", c.args[2], "--base", c.args[1]], 2, r"contains '\.\.'")


@case
def case_index_absolute(w: Path) -> Case:
    base = sharded_base(w)
    index = index_of(base)
    index["weight_map"] = {k: str(base / v) for k, v in index["weight_map"].items()}
    set_index(base, index)
    return Case(["merge", base, peft(w), "-o", w / "out"], 2, r"is an absolute path")


@case
def case_index_symlink_out(w: Path) -> Case:
    base = sharded_base(w)
    elsewhere = w / "elsewhere"
    elsewhere.mkdir()
    first = base / "model-00001-of-00002.safetensors"
    first.rename(elsewhere / first.name)
    first.symlink_to(elsewhere / first.name)
    return Case(["merge", base, peft(w), "-o", w / "out"], 2, r"symbolic link leading out of")


@case
def case_index_duplicate_key(w: Path) -> Case:
    base = sharded_base(w)
    text = json.dumps(index_of(base), indent=2)
    key = next(iter(index_of(base)["weight_map"]))
    text = text.replace('"weight_map": {', f'"weight_map": {{\n    "{key}": "model-00002-of-00002.safetensors",', 1)
    set_index(base, text)
    return Case(["merge", base, peft(w), "-o", w / "out"], 2, rf"key '{re.escape(key)}' appears more than once")


@case
def case_tensor_in_two_shards(w: Path) -> Case:
    base = sharded_base(w)
    key = "model.layers.0.self_attn.q_proj.weight"
    index = index_of(base)
    other = next(f for f in set(index["weight_map"].values()) if f != index["weight_map"][key])
    tensors = {k: torch.zeros(SHAPES[k]) for k, v in index["weight_map"].items() if v == other}
    tensors[key] = torch.ones(SHAPES[key])
    save_file(tensors, str(base / other))
    return Case(["merge", base, peft(w), "-o", w / "out"], 2, rf"tensor '{re.escape(key)}' is stored in both")


@case
def case_index_is_fifo(w: Path) -> Case:
    base = sharded_base(w)
    (base / "model.safetensors.index.json").unlink()
    os.mkfifo(base / "model.safetensors.index.json")
    return Case(["merge", base, peft(w), "-o", w / "out"], 2, r"index\.json: is a FIFO")


@case
def case_index_is_folder(w: Path) -> Case:
    base = sharded_base(w)
    (base / "model.safetensors.index.json").unlink()
    (base / "model.safetensors.index.json").mkdir()
    return Case(["merge", base, peft(w), "-o", w / "out"], 2, r"index\.json: is a directory")


# ---------------------------------------------------------------------------------------------
# 2. --force replaces only what is ours


@case
def case_force_dev_null(w: Path) -> Case:
    return Case(["rescale", kohya(w), "--factor", "2", "-o", "/dev/null", "--force"], 2,
                r"/dev/null: refusing to replace it: it is a character device",
                after=lambda: _assert_char_device("/dev/null"))


@case
def case_dev_null_hint(w: Path) -> Case:
    return Case(["rescale", kohya(w), "--factor", "2", "-o", "/dev/null"], 2,
                r"/dev/null: already exists \(it is a character device\)", not_in_err="pass --force")


def _assert_char_device(p: str) -> None:
    assert stat.S_ISCHR(os.lstat(p).st_mode)


@case
def case_force_fifo(w: Path) -> Case:
    os.mkfifo(w / "pipe")
    return Case(["rescale", kohya(w), "--factor", "2", "-o", w / "pipe", "--force"], 2,
                r"pipe: refusing to replace it: it is a FIFO")


@case
def case_force_output_is_input(w: Path) -> Case:
    lora = kohya(w)
    return Case(["rescale", lora, "--factor", "2", "-o", lora, "--force"], 2, r"is an input of this command")


@case
def case_force_output_is_input_folder(w: Path) -> Case:
    adapter = peft(w)
    return Case(["resize", adapter, "--rank", "2", "-o", adapter, "--force"], 2, r"is an input of this command")


@case
def case_force_output_is_parent_of_input(w: Path) -> Case:
    (w / "a").mkdir()
    lora = kohya(w / "a")
    return Case(["rescale", lora, "--factor", "2", "--format", "peft", "-o", w / "a", "--force"], 2,
                r"contains an input of this command")


@case
def case_merge_output_is_parent_of_base(w: Path) -> Case:
    (w / "models").mkdir()
    base = sharded_base(w / "models")
    return Case(["merge", base, peft(w), "-o", w / "models", "--force"], 2, r"contains an input of this command")


@case
def case_merge_output_inside_base(w: Path) -> Case:
    base = sharded_base(w)
    return Case(["merge", base, peft(w), "-o", base / "merged"], 2, r"is inside an input of this command")


@case
def case_force_unrelated_folder(w: Path) -> Case:
    docs = w / "docs"
    docs.mkdir()
    (docs / "notes.txt").write_text("mine")
    (docs / "photo.jpg").write_bytes(b"\xff\xd8")
    return Case(["resize", peft(w), "--rank", "2", "-o", docs, "--force"], 2,
                r"docs: refusing to replace it: the folder holds files other than adapter files \(notes\.txt, "
                r"photo\.jpg\)")


@case
def case_force_symlink_to_folder(w: Path) -> Case:
    docs = w / "docs"
    docs.mkdir()
    (docs / "notes.txt").write_text("mine")
    (w / "link").symlink_to(docs)
    return Case(["resize", peft(w), "--rank", "2", "-o", w / "link", "--force"], 2,
                r"link: refusing to replace it: it is a symbolic link")


@case
def case_force_foreign_model(w: Path) -> Case:
    other = build_base(w, SHAPES, layout="dir", name="other")  # someone's model, not written by loratool
    (other / "config.json").write_text("{}")
    return Case(["merge", sharded_base(w), peft(w), "-o", other, "--force"], 2,
                r"the folder holds weights loratool did not write \(model\.safetensors\)")


@case
def case_force_folder_with_special_file(w: Path) -> Case:
    out = w / "out"
    out.mkdir()
    os.mkfifo(out / "adapter_model.safetensors")
    return Case(["resize", peft(w), "--rank", "2", "-o", out, "--force"], 2, r"holds special files")


@case
def case_force_folder_for_file_output(w: Path) -> Case:
    (w / "out.safetensors").mkdir()
    return Case(["rescale", kohya(w), "--factor", "2", "-o", w / "out.safetensors", "--force"], 2,
                r"it is a directory and the output is a file")


@case
def case_force_earlier_merge_output(w: Path) -> Case:
    from loratool.ops.merge import merge

    base, adapter = sharded_base(w), peft(w)
    merge(base, [adapter], w / "out", weights=[0.5])
    return Case(["merge", base, adapter, "-o", w / "out", "--force"], 0, "", out=w / "out")


@case
def case_force_earlier_adapter_output(w: Path) -> Case:
    adapter = peft(w)
    return Case(["resize", adapter, "--rank", "2", "-o", w / "out", "--force"], 0, "", out=w / "out",
                after=lambda: None)


@case
def case_output_dot(w: Path) -> Case:
    (w / "sub").mkdir()
    return Case(["rescale", kohya(w), "--factor", "2", "--format", "peft", "-o", ".", "--force"], 2,
                r"\.: is the current folder", cwd=w / "sub")


@case
def case_output_dotdot(w: Path) -> Case:
    (w / "sub").mkdir()
    return Case(["rescale", kohya(w), "--factor", "2", "--format", "peft", "-o", "..", "--force"], 2,
                r"\.\.: is a folder above the current one", cwd=w / "sub")


@case
def case_output_root(w: Path) -> Case:
    return Case(["rescale", kohya(w), "--factor", "2", "--format", "peft", "-o", "/", "--force"], 2,
                r"/: is the root folder")


# ---------------------------------------------------------------------------------------------
# 3. two outputs of one command never collide


@case
def case_report_is_output(w: Path) -> Case:
    return Case(["merge", sharded_base(w), peft(w), "-o", w / "out", "--report", w / "out", "--force"], 2,
                r"two outputs of one command must be different paths")


@case
def case_report_is_output_index(w: Path) -> Case:
    from loratool.ops.merge import merge

    base, adapter = sharded_base(w), peft(w)
    merge(base, [adapter], w / "out")
    return Case(["merge", base, adapter, "-o", w / "out", "--force", "--report",
                 w / "out" / "model.safetensors.index.json"], 2, r"two outputs of one command must be different")


@case
def case_report_is_input(w: Path) -> Case:
    adapter = peft(w)
    return Case(["merge", sharded_base(w), adapter, "-o", w / "out", "--force", "--report",
                 adapter / "adapter_config.json"], 2, r"inside an input of this command")


# ---------------------------------------------------------------------------------------------
# 7. every non-weight file of a base is copied, or the merge fails naming it


def _copied(out: Path, rel: str, text: str) -> Callable[[], None]:
    def check() -> None:
        assert (out / rel).read_text() == text

    return check


@case
def case_base_symlinked_subfolder(w: Path) -> Case:
    base = sharded_base(w)
    tok = w / "elsewhere" / "tokenizer"
    tok.mkdir(parents=True)
    (tok / "tokenizer.json").write_text('{"v": 1}')
    (base / "tokenizer").symlink_to(tok)
    # a folder linked from outside the base is never followed (issue 22 item 4; tests/test_safety_links.py):
    # skipped, with a warning, not copied
    return Case(["merge", base, peft(w), "-o", w / "out"], 0, "", out=w / "out",
                after=lambda: None if not (w / "out" / "tokenizer").exists() else pytest.fail("followed the link"))


@case
def case_base_fifo(w: Path) -> Case:
    base = sharded_base(w)
    os.mkfifo(base / "pipe")
    return Case(["merge", base, peft(w), "-o", w / "out"], 2, r"base/pipe: is a FIFO .*refusing to copy it")


@case
def case_base_broken_link(w: Path) -> Case:
    base = sharded_base(w)
    (base / "vocab.json").symlink_to(w / "gone.json")
    return Case(["merge", base, peft(w), "-o", w / "out"], 2, r"base/vocab\.json: broken symbolic link")


@case
def case_base_link_loop(w: Path) -> Case:
    base = sharded_base(w)
    (base / "again").symlink_to(base)
    return Case(["merge", base, peft(w), "-o", w / "out"], 2, r"symbolic link loop")


if os.geteuid() != 0:  # root reads everything: an unreadable folder cannot be made

    @case
    def case_base_unreadable_subfolder(w: Path) -> Case:
        base = sharded_base(w)
        (base / "secret").mkdir()
        (base / "secret" / "x.json").write_text("{}")
        os.chmod(base / "secret", 0)
        return Case(["merge", base, peft(w), "-o", w / "out"], 2, r"secret: cannot list this folder")

    @case
    def case_unwritable_output_folder(w: Path) -> Case:
        (w / "ro").mkdir()
        os.chmod(w / "ro", 0o555)
        return Case(["rescale", kohya(w), "--factor", "2", "-o", w / "ro" / "x.safetensors"], 2,
                    r"x\.safetensors: cannot write in .*ro")


# ---------------------------------------------------------------------------------------------
# 8. headers the safetensors library refuses; non-float factors


LAYOUTS = {
    "overlap": (dict(down_off=[0, 32], up_off=[16, 48], data_len=48), r"overlapping data"),
    "gap": (dict(down_off=[0, 32], up_off=[40, 72], data_len=72), r"a gap of 8 unaccounted byte"),
    "trailing": (dict(down_off=[0, 32], up_off=[32, 64], data_len=72), r"8 trailing byte\(s\)"),
}


def _layout_case(kind: str, command: str) -> Callable[[Path], Case]:
    def build(w: Path) -> Case:
        path = w / "bad.safetensors"
        if kind == "duplicate-key":
            header = (f'{{"{KOHYA_KEYS[0]}": {{"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 32]}}, '
                      f'"{KOHYA_KEYS[1]}": {{"dtype": "F32", "shape": [4, 2], "data_offsets": [32, 64]}}, '
                      f'"{KOHYA_KEYS[1]}": {{"dtype": "F32", "shape": [4, 2], "data_offsets": [32, 64]}}}}')
            kohya_raw(path, [0, 32], [32, 64], 64, header_text=header)
            pattern = r"header key 'lora_unet_a_proj\.lora_up\.weight' appears more than once"
        else:
            kwargs, pattern = LAYOUTS[kind]
            kohya_raw(path, **kwargs)  # type: ignore[arg-type]
        if command == "validate":
            return Case(["validate", path, "--json"], 1, r'"code": "bad-layout".*' + pattern)
        if command == "inspect":
            return Case(["inspect", path], 2, pattern)
        return Case(["rescale", path, "--factor", "2", "-o", w / "out.safetensors"], 2, pattern)

    return build


for _kind in ("overlap", "gap", "trailing", "duplicate-key"):
    for _command in ("validate", "inspect", "rescale"):
        CASES[f"layout-{_kind}-{_command}"] = _layout_case(_kind, _command)


@case
def case_integer_factors_resize(w: Path) -> Case:
    lora = w / "int.safetensors"
    save_file({KOHYA_KEYS[0]: torch.ones(2, 4, dtype=torch.int64), KOHYA_KEYS[1]: torch.ones(4, 2, dtype=torch.int64)},
              str(lora))
    return Case(["resize", lora, "--rank", "1", "-o", w / "out.safetensors"], 2,
                r"down is int64; LoRA factors must be floating point")


@case
def case_integer_factors_validate(w: Path) -> Case:
    lora = w / "int.safetensors"
    save_file({KOHYA_KEYS[0]: torch.ones(2, 4, dtype=torch.uint8), KOHYA_KEYS[1]: torch.ones(4, 2)}, str(lora))
    return Case(["validate", lora, "--json"], 1, r'"code": "bad-dtype".*down is uint8')


@case
def case_boolean_factor(w: Path) -> Case:
    lora = w / "bool.safetensors"
    save_file({KOHYA_KEYS[0]: torch.ones(2, 4), KOHYA_KEYS[1]: torch.ones(4, 2, dtype=torch.bool)}, str(lora))
    return Case(["rescale", lora, "--factor", "2", "-o", w / "out.safetensors"], 2, r"up is bool; LoRA factors")


@case
def case_boolean_in_header_shape(w: Path) -> Case:
    header = {KOHYA_KEYS[0]: {"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]},
              KOHYA_KEYS[1]: {"dtype": "F32", "shape": [4, 1], "data_offsets": [16, 32]}}
    path = raw_safetensors(w / "boolshape.safetensors", header, bytes(32))
    return Case(["inspect", path], 2, r"tensor 'lora_unet_a_proj\.lora_down\.weight': bad shape \[True, 4\]")


# ---------------------------------------------------------------------------------------------
# 9. user conditions that used to end as "internal error"


@case
def case_unwritable_system_folder(w: Path) -> Case:
    return Case(["rescale", kohya(w), "--factor", "2", "-o", "/sys/loratool-test.safetensors"], 2,
                r"/sys/loratool-test\.safetensors: cannot write in /sys")


@case
def case_name_too_long(w: Path) -> Case:
    return Case(["rescale", kohya(w), "--factor", "2", "-o", w / ("a" * 250 + ".safetensors")], 2,
                r"the name is 262 bytes long; the filesystem allows at most 255")


@case
def case_name_of_250_characters(w: Path) -> Case:
    out = w / ("b" * 238 + ".safetensors")
    return Case(["rescale", kohya(w), "--factor", "2", "-o", out], 0, "", out=out)


@case
def case_resize_nan(w: Path) -> Case:
    return Case(["resize", kohya(w, nan=True), "--rank", "2", "-o", w / "out.safetensors"], 2,
                r"lora\.safetensors: module '.*': down holds NaN or Inf values")


@case
def case_combine_inf(w: Path) -> Case:
    return Case(["combine", kohya(w, inf=True), kohya(w, "ok.safetensors"), "--method", "svd", "--rank", "2",
                 "--weights", "1,1", "-o", w / "out.safetensors"], 2, r"down holds NaN or Inf values")


@case
def case_rescale_factor_1e308(w: Path) -> Case:
    return Case(["rescale", kohya(w), "--factor", "1e308", "-o", w / "out.safetensors"], 2,
                r"out\.safetensors: module '.*': alpha inf .* is not a finite number")


@case
def case_combine_weights_1e308(w: Path) -> Case:
    a = peft(w)
    return Case(["combine", a, a, "--method", "svd", "--rank", "2", "--weights", "1e308,1e308",
                 "-o", w / "out"], 2, r"weight 1e\+308 × scale .* is beyond float32")


@case
def case_alpha_1e308(w: Path) -> Case:
    return Case(["resize", peft(w, config={"lora_alpha": 1e308}), "--rank", "2", "-o", w / "out"], 2,
                r"out: module '.*': its delta .* is beyond float32")


@case
def case_alpha_10_pow_400(w: Path) -> Case:
    adapter = peft(w)
    config = (adapter / "adapter_config.json").read_text()
    (adapter / "adapter_config.json").write_text(re.sub(r'"lora_alpha": \d+', '"lora_alpha": 1' + "0" * 400, config))
    return Case(["resize", adapter, "--rank", "2", "-o", w / "out"], 2,
                r"adapter_config\.json: 'lora_alpha' is 401 digits long")


@case
def case_invalid_target_modules_regex(w: Path) -> Case:
    return Case(["resize", peft(w, config={"target_modules": "(["}), "--rank", "2", "-o", w / "out"], 2,
                r"adapter_config\.json: 'target_modules' is not a valid regular expression")


@case
def case_hf_path_with_dotdot(w: Path) -> Case:
    return Case(["inspect", "hf://owner/repo/../../etc"], 2, r"bad path inside the repo")


# ---------------------------------------------------------------------------------------------
# the corpus


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                       monkeypatch: pytest.MonkeyPatch) -> None:
    check_case(CASES[name], tmp_path, capsys, monkeypatch)


def check_case(make: Callable[[Path], Case], tmp_path: Path, capsys: pytest.CaptureFixture[str],
               monkeypatch: pytest.MonkeyPatch) -> None:
    """Build the case under tmp_path/w, run it within BOUND seconds, and check its exit code, its one
    Error: line and that nothing under tmp_path changed outside its -o."""
    w = tmp_path / "w"
    w.mkdir()
    c = make(w)
    monkeypatch.chdir(c.cwd or tmp_path)
    monkeypatch.delenv("LORATOOL_DEBUG", raising=False)
    before = snapshot(tmp_path)
    with bounded(BOUND):
        code, out, err = run(capsys, c.args)
    after = snapshot(tmp_path)
    assert code == c.code, (out, err)
    assert "Traceback" not in err
    errors = error_lines(err)
    if code == 2:
        assert len(errors) == 1 and re.search(c.message, errors[0]), err
        assert out == ""
    elif code == 1:
        assert re.search(c.message, out, re.S), out
    else:
        assert not errors, err
    if c.not_in_err:
        assert c.not_in_err not in err
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if code == 0 and c.out is not None:
        mine = os.path.relpath(c.out, tmp_path)
        changed = [k for k in changed if k != mine and not k.startswith(mine + os.sep)]
    assert changed == [], changed  # every input byte-identical, nothing outside -o touched
    if c.after:
        c.after()


def test_corpus_covers_every_item() -> None:
    """The issue's items 1-3 and 7-9 each have cases (4-6 and 10 have their own tests below and in
    test_safety_signals.py)."""
    names = set(CASES)
    for needle in ("index-dotdot", "index-absolute", "index-symlink-out", "index-duplicate-key",  # 1
                   "force-dev-null", "force-fifo", "force-output-is-input", "force-unrelated-folder",  # 2
                   "force-symlink-to-folder", "output-dot", "output-dotdot", "output-root",
                   "report-is-output", "report-is-output-index",  # 3
                   "base-symlinked-subfolder", "merge-output-inside-base",  # 7
                   "layout-overlap-validate", "layout-gap-rescale", "layout-trailing-inspect",  # 8
                   "layout-duplicate-key-validate", "integer-factors-resize", "boolean-factor",
                   "name-too-long", "resize-nan", "combine-inf", "rescale-factor-1e308", "alpha-10-pow-400",  # 9
                   "boolean-in-header-shape", "invalid-target-modules-regex", "hf-path-with-dotdot",
                   "index-is-fifo"):
        assert needle in names, needle


# ---------------------------------------------------------------------------------------------
# 5. temporaries of dead runs are removed by the next run (never a live run's), with a warning


def _dead_pid() -> int:
    import subprocess

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_next_run_removes_temporaries_of_dead_runs_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    w = tmp_path
    lora = kohya(w)
    dead, live = _dead_pid(), os.getppid()  # our parent outlives this test
    stale_file = w / f".out.safetensors.tmp-{dead}-0a1b2c3d"
    stale_file.write_bytes(b"half")
    stale_dir = w / f".out.safetensors.tmp-{dead}-0a1b2c3e"
    stale_dir.mkdir()
    (stale_dir / "x").write_bytes(b"old")
    alive = w / f".out.safetensors.tmp-{live}-0a1b2c3f"
    alive.write_bytes(b"someone is writing this")
    other = w / f".other.safetensors.tmp-{dead}-0a1b2c40"  # another output's: not ours to judge
    other.write_bytes(b"x")
    code, _, err = run(capsys, ["rescale", lora, "--factor", "2", "-o", w / "out.safetensors"])
    assert code == 0, err
    assert not stale_file.exists() and not stale_dir.exists()
    assert alive.read_bytes() == b"someone is writing this" and other.exists()
    assert err.count("Warning:") == 1
    text = " ".join(err.split())  # rich wraps long lines
    assert "removed 2 temporary file(s) left by earlier runs that did not finish" in text
    assert f"{stale_file.name} (pid {dead})" in text and f"{stale_dir.name} (pid {dead})" in text


def test_a_live_lock_refuses_a_second_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The claim is a lock beside the output: while another process holds it, a run exits 2 at once."""
    import fcntl

    lora = kohya(tmp_path)
    lock = tmp_path / ".out.safetensors.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    os.write(fd, b"4242\n")
    import subprocess

    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               f"f = open({str(lock)!r}, 'r+')\nfcntl.flock(f, fcntl.LOCK_EX)\n"
                               "print('locked', flush=True)\nsys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        before = snapshot(tmp_path)
        code, _, err = run(capsys, ["rescale", lora, "--factor", "2", "-o", tmp_path / "out.safetensors"])
        assert code == 2 and re.search(r"out\.safetensors: another loratool run \(pid 4242\) is writing it",
                                       error_lines(err)[0]), err
        assert snapshot(tmp_path) == before
    finally:
        holder.communicate("")
        os.close(fd)
    del fcntl
    code, _, err = run(capsys, ["rescale", lora, "--factor", "2", "-o", tmp_path / "out.safetensors"])
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors", "out.safetensors"]


# ---------------------------------------------------------------------------------------------
# 6. a failing --report says what is on disk


def test_failing_report_says_the_merged_model_was_written(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    base, adapter = sharded_base(tmp_path), peft(tmp_path)
    real = Path.write_text

    def full_disk(self: Path, *args: Any, **kwargs: Any) -> int:
        if self.name.startswith(".report.json.tmp-"):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    code, _, err = run(capsys, ["merge", base, adapter, "-o", tmp_path / "out", "--report", tmp_path / "report.json"])
    assert code == 2
    (line,) = error_lines(err)
    assert "report.json: no space left on device" in line
    assert f"nothing was written to {tmp_path / 'report.json'}" in line
    assert f"the merged model was written to {tmp_path / 'out'}" in line
    assert (tmp_path / "out" / "model.safetensors.index.json").exists() and not (tmp_path / "report.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------
# 9. an input truncated or removed while a merge reads it


@pytest.mark.parametrize("how", ["truncate", "remove"])
def test_input_changed_during_merge(tmp_path: Path, how: str) -> None:
    from loratool.errors import FormatError
    from loratool.ops.merge import merge

    shapes = {f"model.layers.{i}.mlp.down_proj.weight": (256, 256) for i in range(6)}
    base = build_base(tmp_path, shapes, layout="dir")
    adapter = build_adapter(tmp_path, fmt="peft", modules={"model.layers.5.mlp.down_proj": (256, 256)})
    weights = base / "model.safetensors"
    calls = {"n": 0}

    def progress(done: int, total: int) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            if how == "truncate":
                os.truncate(weights, weights.stat().st_size // 2)
            else:
                weights.unlink()

    if how == "truncate":
        with pytest.raises(FormatError, match=r"model\.safetensors: ended at byte \d+ while being read"):
            merge(base, [adapter], tmp_path / "out", progress=progress)
    else:  # the open file is still read whole on Linux: removing it is harmless
        merge(base, [adapter], tmp_path / "out", progress=progress)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------
# 10. no Hub token in anything loratool prints, tracebacks included


TOKEN = "hf_safetyTestSecret0123456789abcdefXYZ"


@pytest.mark.parametrize("kind", ["internal", "user"])
def test_debug_traceback_hides_the_token(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    import loratool.ops.rescale as rescale_op
    from loratool.errors import HubError

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("LORATOOL_DEBUG", "1")

    def echoing_server(*args: Any, **kwargs: Any) -> Any:
        text = f"401: token {TOKEN} rejected (Authorization: Bearer {TOKEN})"
        raise RuntimeError(text) if kind == "internal" else HubError(text)

    monkeypatch.setattr(rescale_op, "rescale", echoing_server)
    code, out, err = run(capsys, ["rescale", kohya(tmp_path), "--factor", "2", "-o", tmp_path / "o.safetensors"])
    assert code == (3 if kind == "internal" else 2)
    assert "Traceback" in err  # LORATOOL_DEBUG=1 still shows it ...
    assert TOKEN not in err and TOKEN not in out  # ... without the token
    assert "***" in err


def test_token_given_on_the_command_line_is_hidden(capsys: pytest.CaptureFixture[str]) -> None:
    secret = "my-own-non-hf-shaped-secret-42"
    code, out, err = run(capsys, ["pull", "owner/repo", "--token", secret, "unexpected", secret])
    assert code == 2 and secret not in err and secret not in out
