"""The hostile corpus (issue 22, "Must show"): over 1,000 command lines an attacker or a careless
user might run, each with its own small folder of inputs built at test time.

A case is a command line and a builder that writes its inputs under the case's folder (cwd of the
run; every path in the command line is relative to it). What is hostile, by group:

    header    malformed safetensors headers: truncated, huge lengths, overlapping/negative offsets,
              bad dtypes and shapes, non-UTF-8, duplicate keys, nested JSON, odd key names
    config    bad adapter_config.json: wrong types, huge numbers, deep nesting, not JSON, empty
    special   special files: FIFOs, directories where files belong, links out, loops, empty files
    regex     bad or explosive regexes in rank_pattern / alpha_pattern / --modules / --module-weights
    archive   .pt zip structure (with and without --allow-pickle) and .npz archives
    gguf      GGUF fields: magic, version, absurd counts, bad value and tensor types, alignment
    tensor    shape and rank mismatches, NaN / Inf, integer and boolean factors, LyCORIS parts
    base      hostile base models and fine-tuned models (merge, verify, extract, validate --base)
    options   bad option values and combinations
    token     the token planted in inputs (metadata, config) or reachable through a link

With tests/perf/hostile_tally.py --all, every adapter-shaped input runs through every adapter command
(inspect, validate, rescale, resize, convert, combine, merge, verify, diff) and every base through
merge, verify, extract, validate and convert; the test suite takes one reading and one writing
command per input in turn (Case.suite), over 1,000 runs. pull/push are left to the Hub tests
(tests/hub/); every run has HF_HUB_OFFLINE=1 and an empty HF_HOME.

What a case must show (test_hostile_corpus.py asserts it, tests/perf/hostile_tally.py prints it):
exit 0, 1 or 2 (never 3, never a signal), no traceback, finished within its bound, no byte changed
in its folder outside the outputs it names (-o / --report), and the fake token (runner.FAKE_TOKEN,
in every run's HF_TOKEN) in no stdout, stderr or written file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import stat
import struct
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from factories import DEFAULT_PEFT_MODULES, build_adapter, build_base
from runner import FAKE_TOKEN
from safetensors.torch import save_file

BOUND = 30.0  # seconds a case may run (tiny inputs: real runs take well under a second)

Builder = Callable[[Path], str]  # writes an input under the case folder, returns its relative path


@dataclass(frozen=True)
class Case:
    id: str
    group: str
    command: str  # the loratool command (argv[0])
    build: Callable[[Path], list[str]]  # writes the inputs, returns argv (paths relative to the folder)
    suite: bool = True  # run by the test suite (False: only by tests/perf/hostile_tally.py --all)
    python: str | None = None  # Python run instead of loratool (the harness's own tests)


OUT_OPTIONS = ("-o", "--out", "--report")


def outputs_of(argv: list[str]) -> list[str]:
    """The paths a command line names as outputs (relative to the case folder)."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in OUT_OPTIONS]


# ---------------------------------------------------------------------------------------------
# small builders

Q = "model.layers.0.self_attn.q_proj"
KQ = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
PFX = "base_model.model."


def write(path: Path, content: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    return path


def st_bytes(header: dict[str, Any] | bytes, data: bytes = b"", *, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def good_peft(root: Path, name: str = "good", **kw: Any) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return build_adapter(root, fmt="peft", name=name, **kw)


def good_kohya(root: Path, name: str = "good.safetensors", **kw: Any) -> Path:
    kw.setdefault("modules", {KQ: (32, 32)})
    root.mkdir(parents=True, exist_ok=True)
    return build_adapter(root, fmt="kohya", name=name, **kw)


def llama_base(root: Path, name: str = "base", layout: str = "dir", dtype: str = "float32") -> Path:
    shapes = {f"{m}.weight": s for m, s in DEFAULT_PEFT_MODULES.items()}
    return build_base(root, shapes, layout=layout, name=name, dtype=dtype)


def kohya_parts() -> tuple[dict[str, Any], bytes]:
    """A valid kohya header (down (4, 32), up (32, 4), alpha) and its data section."""
    g = torch.Generator().manual_seed(0)
    down = torch.randn(4, 32, generator=g).numpy().tobytes()
    up = torch.randn(32, 4, generator=g).numpy().tobytes()
    alpha = np.float32(4.0).tobytes()
    header = {
        "__metadata__": {"ss_network_dim": "4"},
        f"{KQ}.lora_down.weight": {"dtype": "F32", "shape": [4, 32], "data_offsets": [0, 512]},
        f"{KQ}.lora_up.weight": {"dtype": "F32", "shape": [32, 4], "data_offsets": [512, 1024]},
        f"{KQ}.alpha": {"dtype": "F32", "shape": [], "data_offsets": [1024, 1028]},
    }
    return header, down + up + alpha


DOWN, UP, ALPHA = f"{KQ}.lora_down.weight", f"{KQ}.lora_up.weight", f"{KQ}.alpha"


def _edit(fn: Callable[[dict[str, Any]], Any]) -> Callable[[], bytes]:
    """A header edit on the valid kohya parts -> the file's bytes."""

    def make() -> bytes:
        header, data = kohya_parts()
        fn(header)
        return st_bytes(header, data)

    return make


def _set(key: str, field: str, value: Any) -> Callable[[], bytes]:
    return _edit(lambda h: h[key].__setitem__(field, value))


def _raw_header(text: bytes, data: bytes | None = None) -> Callable[[], bytes]:
    return lambda: st_bytes(text, kohya_parts()[1] if data is None else data)


def _valid() -> bytes:
    header, data = kohya_parts()
    return st_bytes(header, data)


def _dup_keys() -> bytes:
    header, data = kohya_parts()
    text = json.dumps(header)[:-1] + ', "' + DOWN + '": {"dtype": "F32", "shape": [4, 32], "data_offsets": [0, 512]}}'
    return st_bytes(text.encode(), data)


def _many_tensors(n: int) -> Callable[[], bytes]:
    def make() -> bytes:
        header: dict[str, Any] = {}
        for i in range(n):
            header[f"lora_unet_b{i}.lora_down.weight"] = {
                "dtype": "F32",
                "shape": [1, 1],
                "data_offsets": [8 * i, 8 * i + 4],
            }
            header[f"lora_unet_b{i}.lora_up.weight"] = {
                "dtype": "F32",
                "shape": [1, 1],
                "data_offsets": [8 * i + 4, 8 * i + 8],
            }
        return st_bytes(header, b"\0" * (8 * n))

    return make


def _key_named(name: str) -> Callable[[], bytes]:
    def make() -> bytes:
        header, data = kohya_parts()
        header[name + ".lora_down.weight"] = header.pop(DOWN)
        header[name + ".lora_up.weight"] = header.pop(UP)
        header[name + ".alpha"] = header.pop(ALPHA)
        return st_bytes(header, data)

    return make


HEADERS: dict[str, Callable[[], bytes]] = {
    "truncated-in-data": lambda: _valid()[:-300],
    "truncated-in-header": lambda: _valid()[:40],
    "truncated-in-length": lambda: _valid()[:5],
    "length-huge": lambda: st_bytes(json.dumps(kohya_parts()[0]).encode(), kohya_parts()[1], length=(1 << 63) - 1),
    "length-all-ones": lambda: st_bytes(json.dumps(kohya_parts()[0]).encode(), kohya_parts()[1], length=(1 << 64) - 1),
    "length-negative-one": lambda: struct.pack("<q", -1) + json.dumps(kohya_parts()[0]).encode(),
    "length-zero": lambda: st_bytes(b"", b"\0" * 64),
    "length-short-by-one": lambda: st_bytes(
        json.dumps(kohya_parts()[0]).encode(), kohya_parts()[1], length=len(json.dumps(kohya_parts()[0])) - 1
    ),
    "length-100MB-beyond-file": lambda: st_bytes(b"{}", length=100 << 20),
    "offsets-negative": _set(DOWN, "data_offsets", [-512, 0]),
    "offsets-reversed": _set(DOWN, "data_offsets", [512, 0]),
    "offsets-huge": _set(DOWN, "data_offsets", [0, 1 << 64]),
    "offsets-2^63": _set(DOWN, "data_offsets", [(1 << 63) - 512, (1 << 63)]),
    "offsets-floats": _set(DOWN, "data_offsets", [0.0, 512.0]),
    "offsets-three": _set(DOWN, "data_offsets", [0, 256, 512]),
    "offsets-string": _set(DOWN, "data_offsets", "0-512"),
    "offsets-null": _set(DOWN, "data_offsets", None),
    "offsets-overlapping": _set(UP, "data_offsets", [256, 768]),
    "offsets-same-bytes": _set(UP, "data_offsets", [0, 512]),
    "offsets-gap": _set(ALPHA, "data_offsets", [1020, 1024]),
    "offsets-bool": _set(DOWN, "data_offsets", [False, True]),
    "dtype-unknown": _set(DOWN, "dtype", "F128"),
    "dtype-empty": _set(DOWN, "dtype", ""),
    "dtype-number": _set(DOWN, "dtype", 5),
    "dtype-null": _set(DOWN, "dtype", None),
    "dtype-lowercase": _set(DOWN, "dtype", "f32"),
    "dtype-bool-factor": _edit(lambda h: h[DOWN].update(dtype="BOOL", data_offsets=[0, 128])),
    "dtype-int64-factor": _set(DOWN, "dtype", "I64")
    if False
    else _edit(lambda h: h[DOWN].update(dtype="I64", shape=[4, 16])),
    "dtype-u8-factor": _edit(lambda h: h[DOWN].update(dtype="U8", shape=[4, 128])),
    "dtype-f8-factor": _edit(lambda h: h[DOWN].update(dtype="F8_E4M3", shape=[4, 128])),
    "dtype-f64-alpha": _edit(lambda h: h[ALPHA].update(dtype="F64", shape=[], data_offsets=[1024, 1028])),
    "shape-negative": _set(DOWN, "shape", [-4, -32]),
    "shape-huge": _set(DOWN, "shape", [1 << 40, 1 << 40]),
    "shape-overflow": _set(DOWN, "shape", [1 << 62, 16]),
    "shape-floats": _set(DOWN, "shape", [4.0, 32.0]),
    "shape-string": _set(DOWN, "shape", "4x32"),
    "shape-bools": _set(DOWN, "shape", [True, 4]),
    "shape-64-dims": _set(DOWN, "shape", [1] * 63 + [128]),
    "shape-zero": _set(DOWN, "shape", [0, 32]),
    "not-utf8": _raw_header(b'{"\xff\xfe.lora_down.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'),
    "lone-surrogate-key": _raw_header(
        b'{"' + KQ.encode() + b'\\ud800.lora_down.weight": {"dtype": "F32", '
        b'"shape": [4, 32], "data_offsets": [0, 512]}}'
    ),
    "nul-in-key": _key_named("lora_unet_a\x00b"),
    "newline-in-key": _key_named("lora_unet_a\nError: forged line"),
    "ansi-escape-in-key": _key_named("lora_unet_\x1b[2J\x1b[31mred"),
    "empty-key-stem": _key_named(""),
    "dotdot-key": _key_named("../../../etc/passwd"),
    "key-100k-chars": _key_named("lora_unet_" + "x" * 100_000),
    "duplicate-keys": _dup_keys,
    "nested-list-100k": _raw_header(b"[" * 100_000 + b"]" * 100_000),
    "nested-object-entry": _set(DOWN, "shape", {"a": {"b": {"c": [4, 32]}}}),
    "nested-metadata": _edit(lambda h: h.__setitem__("__metadata__", {"a": {"b": {"c": "d"}}})),
    "metadata-list": _edit(lambda h: h.__setitem__("__metadata__", ["a", "b"])),
    "metadata-number": _edit(lambda h: h["__metadata__"].__setitem__("ss_network_dim", 4)),
    "metadata-1MB-value": _edit(lambda h: h["__metadata__"].__setitem__("ss_tag_frequency", "x" * (1 << 20))),
    "metadata-deep-json-string": _edit(
        lambda h: h["__metadata__"].__setitem__("lora_adapter_metadata", "[" * 50_000 + "]" * 50_000)
    ),
    "entry-a-list": _edit(lambda h: h.__setitem__(DOWN, [1, 2])),
    "entry-missing-dtype": _edit(lambda h: h[DOWN].pop("dtype")),
    "entry-extra-field": _edit(lambda h: h[DOWN].__setitem__("evil", {"x": 1})),
    "header-json-list": _raw_header(b"[1, 2, 3]"),
    "header-json-string": _raw_header(b'"abc"'),
    "header-json-null": _raw_header(b"null"),
    "header-not-json": _raw_header(b"{this is not json"),
    "header-trailing-garbage": lambda: st_bytes(json.dumps(kohya_parts()[0]).encode() + b"}}garbage", kohya_parts()[1]),
    "header-utf8-bom": lambda: st_bytes(b"\xef\xbb\xbf" + json.dumps(kohya_parts()[0]).encode(), kohya_parts()[1]),
    "header-nul-padding": lambda: st_bytes(json.dumps(kohya_parts()[0]).encode() + b"\0" * 8, kohya_parts()[1]),
    "header-5000-digit-int": _raw_header(
        b'{"a.lora_down.weight": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}', b"\0" * 4
    ),
    "header-infinity-literal": _raw_header(
        b'{"a.lora_down.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, Infinity]}}', b"\0" * 4
    ),
    "header-nan-literal": _raw_header(
        b'{"a.lora_down.weight": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}', b"\0" * 4
    ),
    "data-trailing-bytes": lambda: _valid() + b"\0" * 100,
    "many-tensors-4k": _many_tensors(2_000),
    "empty-header-object": lambda: st_bytes(b"{}"),
    "only-metadata": lambda: st_bytes({"__metadata__": {"format": "pt"}}),
    "random-bytes": lambda: bytes((i * 7919 + 13) % 256 for i in range(4096)),
}


def _copy_tree(src: Path, dst: Path) -> None:
    """Copy a built case folder: links as links, FIFOs and sockets made anew, files by bytes."""
    dst.mkdir(parents=True, exist_ok=True)
    for entry in os.scandir(src):
        s, d = Path(entry.path), dst / entry.name
        mode = os.lstat(s).st_mode
        if stat.S_ISLNK(mode):
            d.symlink_to(os.readlink(s))
        elif stat.S_ISDIR(mode):
            _copy_tree(s, d)
        elif stat.S_ISFIFO(mode):
            os.mkfifo(d)
        elif stat.S_ISSOCK(mode):
            _socket_file(d)
        else:
            d.write_bytes(s.read_bytes())


_TEMPLATES: dict[int, tuple[Path, Any]] = {}  # id(build) -> (its template folder, what it returned)
_TEMPLATE_ROOT: list[Path] = []  # set by run_corpus while it builds


def templated(build: Callable[[Path], Any]) -> Callable[[Path], Any]:
    """`build` run once per corpus into a template folder, then copied: the same input is used by
    many commands, and some (zip bombs, 100k-deep JSON) are slow to make."""

    def copy(root: Path) -> Any:
        key = id(build)
        if key not in _TEMPLATES:
            where = _TEMPLATE_ROOT[0] / str(len(_TEMPLATES))
            where.mkdir(parents=True)
            _TEMPLATES[key] = (where, build(where))
        where, value = _TEMPLATES[key]
        _copy_tree(where, root)
        return value

    return copy


def header_file(name: str) -> Builder:
    def build(root: Path) -> str:
        write(root / "in" / "adapter.safetensors", HEADERS[name]())
        return "in/adapter.safetensors"

    return build


def header_in_peft(name: str) -> Builder:
    """The malformed file as the weights of a PEFT folder with a valid config."""

    def build(root: Path) -> str:
        d = good_peft(root / "in", name="ad")
        write(d / "adapter_model.safetensors", HEADERS[name]())
        return "in/ad"

    return build


# ---------------------------------------------------------------------------------------------
# adapter_config.json

CONFIG_VALUES: dict[str, Any] = {
    "r-string": {"r": "eight"},
    "r-negative": {"r": -4},
    "r-zero": {"r": 0},
    "r-float": {"r": 4.5},
    "r-1e30": {"r": 1e30},
    "r-2^70": {"r": 1 << 70},
    "r-bool": {"r": True},
    "r-null": {"r": None},
    "r-list": {"r": [4]},
    "r-object": {"r": {"a": 1}},
    "alpha-string": {"lora_alpha": "x"},
    "alpha-1e308": {"lora_alpha": 1e308},
    "alpha-zero": {"lora_alpha": 0},
    "alpha-negative": {"lora_alpha": -8},
    "alpha-bool": {"lora_alpha": True},
    "alpha-list": {"lora_alpha": []},
    "alpha-2^80": {"lora_alpha": 1 << 80},
    "alpha-tiny": {"lora_alpha": 5e-324},
    "rslora-string": {"use_rslora": "yes"},
    "rslora-int": {"use_rslora": 2},
    "dora-string": {"use_dora": "false"},
    "dora-true-no-magnitudes": {"use_dora": True},
    "fifo-flag-string": {"fan_in_fan_out": "no"},
    "fan-in-fan-out-true": {"fan_in_fan_out": True},
    "targets-number": {"target_modules": 5},
    "targets-null": {"target_modules": None},
    "targets-ints": {"target_modules": [1, 2]},
    "targets-nested": {"target_modules": [["q_proj"]]},
    "targets-regex-bad": {"target_modules": "(unclosed"},
    "rank-pattern-list": {"rank_pattern": ["q_proj", 4]},
    "rank-pattern-string": {"rank_pattern": "q_proj=4"},
    "rank-pattern-negative": {"rank_pattern": {"q_proj": -1}},
    "rank-pattern-zero": {"rank_pattern": {"q_proj": 0}},
    "rank-pattern-huge": {"rank_pattern": {"q_proj": 1e30}},
    "rank-pattern-bool": {"rank_pattern": {"q_proj": True}},
    "rank-pattern-empty-key": {"rank_pattern": {"": 4}},
    "alpha-pattern-string": {"alpha_pattern": {"q_proj": "16"}},
    "alpha-pattern-null": {"alpha_pattern": None},
    "alpha-pattern-huge": {"alpha_pattern": {"v_proj": 1e308}},
    "alpha-pattern-list": {"alpha_pattern": [1]},
    "modules-to-save-string": {"modules_to_save": "lm_head"},
    "modules-to-save-ints": {"modules_to_save": [1]},
    "modules-to-save-absent": {"modules_to_save": ["lm_head"]},
    "peft-type-loha": {"peft_type": "LOHA"},
    "peft-type-number": {"peft_type": 5},
    "peft-type-lower": {"peft_type": "lora"},
    "base-model-number": {"base_model_name_or_path": 5},
    "base-model-list": {"base_model_name_or_path": ["a"]},
    "base-model-dotdot": {"base_model_name_or_path": "../../../../etc/passwd"},
    "base-model-100k": {"base_model_name_or_path": "x" * 100_000},
    "base-model-newline": {"base_model_name_or_path": "a\nError: forged"},
    "layers-to-transform-string": {"layers_to_transform": "x"},
    "layers-to-transform-negative": {"layers_to_transform": [-1]},
    "task-type-object": {"task_type": {"a": 1}},
    "all-keys-null": {
        k: None
        for k in (
            "r",
            "lora_alpha",
            "target_modules",
            "rank_pattern",
            "alpha_pattern",
            "use_rslora",
            "use_dora",
            "fan_in_fan_out",
            "peft_type",
        )
    },
}

CONFIG_TEXTS: dict[str, bytes] = {
    "empty": b"",
    "space": b"   \n",
    "null": b"null",
    "list": b"[4, 8]",
    "string": b'"r"',
    "number": b"4",
    "not-json": b"{r: 4,",
    "truncated": b'{"r": 4, "lora_al',
    "nul-bytes": b'{"r": 4}\0\0\0',
    "utf8-bom": b'\xef\xbb\xbf{"r": 4, "lora_alpha": 8}',
    "utf16": '{"r": 4}'.encode("utf-16"),
    "latin1": b'{"r": 4, "base_model_name_or_path": "caf\xe9"}',
    "lone-surrogate": b'{"r": 4, "x\\ud800": 1}',
    "duplicate-r": b'{"r": 4, "r": 8, "lora_alpha": 8, "peft_type": "LORA"}',
    "deep-100k": b"[" * 100_000 + b"]" * 100_000,
    "deep-object-100k": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "5000-digit-r": b'{"r": ' + b"9" * 5000 + b', "peft_type": "LORA"}',
    "1e999-alpha": b'{"r": 4, "lora_alpha": 1e999, "peft_type": "LORA"}',
    "nan-alpha": b'{"r": 4, "lora_alpha": NaN, "peft_type": "LORA"}',
    "infinity-r": b'{"r": Infinity, "lora_alpha": 8, "peft_type": "LORA"}',
    "minus-infinity-pattern": b'{"r": 4, "lora_alpha": 8, "alpha_pattern": {"q_proj": -Infinity}, "peft_type": "LORA"}',
    "5MB-padding": b'{"r": 4, "lora_alpha": 8, "peft_type": "LORA", "pad": "' + b"x" * (5 << 20) + b'"}',
}


def config_values(name: str) -> Builder:
    def build(root: Path) -> str:
        good_peft(root / "in", name="ad", config=CONFIG_VALUES[name])
        return "in/ad"

    return build


def config_text(name: str) -> Builder:
    def build(root: Path) -> str:
        d = good_peft(root / "in", name="ad")
        write(d / "adapter_config.json", CONFIG_TEXTS[name])
        return "in/ad"

    return build


# ---------------------------------------------------------------------------------------------
# special files


def _fifo(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        path.unlink()
    os.mkfifo(path)


def _socket_file(path: Path) -> None:
    if path.exists():
        path.unlink()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(str(path))
    finally:
        s.close()


def _replace_with(path: Path, how: str, root: Path) -> None:
    """Turn `path` (inside the case folder) into a special file."""
    if path.is_dir() and not path.is_symlink():
        for p in path.iterdir():
            p.unlink()
        path.rmdir()
    elif path.exists() or path.is_symlink():
        path.unlink()
    if how == "fifo":
        _fifo(path)
    elif how == "socket":
        _socket_file(path)
    elif how == "directory":
        path.mkdir()
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "dangling-link":
        path.symlink_to(root / "nowhere" / "missing")
    elif how == "link-loop":
        path.symlink_to(path.name)
    elif how == "link-dev-zero":
        path.symlink_to("/dev/zero")
    elif how == "link-dev-null":
        path.symlink_to("/dev/null")
    elif how == "link-proc-environ":
        path.symlink_to("/proc/self/environ")
    elif how == "link-out":  # a valid copy of the file outside the input folder
        target = root / "outside" / path.name
        target.parent.mkdir(exist_ok=True)
        path.symlink_to(os.path.relpath(target, path.parent))
    else:
        raise ValueError(how)


SPECIAL_KINDS = (
    "fifo",
    "socket",
    "directory",
    "empty",
    "dangling-link",
    "link-loop",
    "link-dev-zero",
    "link-dev-null",
    "link-proc-environ",
    "link-out",
)


def special_in_peft(member: str, how: str) -> Builder:
    def build(root: Path) -> str:
        d = good_peft(root / "in", name="ad")
        if how == "link-out":
            good_peft(root / "outside", name="copy")
            (root / "outside" / "copy" / member).rename(root / "outside" / member)
        _replace_with(d / member, how, root)
        return "in/ad"

    return build


def special_path(how: str) -> Builder:
    """The adapter path itself is special."""

    def build(root: Path) -> str:
        p = root / "in" / "adapter.safetensors"
        if how == "link-out":
            good_kohya(root / "outside", name="adapter.safetensors")
            p.parent.mkdir(parents=True)
            p.symlink_to("../outside/adapter.safetensors")
            return "in/adapter.safetensors"
        if how == "link-dir-out":
            good_peft(root / "outside", name="ad")
            p.parent.mkdir(parents=True)
            (root / "in" / "ad").symlink_to("../outside/ad")
            return "in/ad"
        p.parent.mkdir(parents=True)
        p.write_bytes(b"")
        _replace_with(p, how, root)
        return "in/adapter.safetensors"

    return build


def odd_folder(kind: str) -> Builder:
    def build(root: Path) -> str:
        d = root / "in" / "ad"
        if kind == "empty-folder":
            d.mkdir(parents=True)
        elif kind == "both-bin-and-safetensors":
            good_peft(root / "in", name="ad")
            torch.save({"x": torch.zeros(1)}, d / "adapter_model.bin")
        elif kind == "two-safetensors":
            good_kohya(d, name="a.safetensors")
            good_kohya(d, name="b.safetensors", seed=1)
        elif kind == "config-only":
            good_peft(root / "in", name="ad")
            (d / "adapter_model.safetensors").unlink()
        elif kind == "weights-only":
            good_peft(root / "in", name="ad", config=False)
        elif kind == "hidden-config":
            good_peft(root / "in", name="ad")
            (d / "adapter_config.json").rename(d / ".adapter_config.json")
        elif kind == "name-with-newline":
            good_kohya(root / "in", name="a\nError: forged.safetensors")
            return "in/a\nError: forged.safetensors"
        elif kind == "name-256-chars":
            return "in/" + "x" * 300 + ".safetensors"
        elif kind == "missing":
            return "in/does-not-exist.safetensors"
        elif kind == "trailing-slash-file":
            good_kohya(root / "in", name="adapter.safetensors")
            return "in/adapter.safetensors/"
        elif kind == "nested-folders":
            good_peft(root / "in" / "a" / "b" / "c", name="ad")
            return "in/a"
        else:
            raise ValueError(kind)
        return "in/ad"

    return build


ODD_FOLDERS = (
    "empty-folder",
    "both-bin-and-safetensors",
    "two-safetensors",
    "config-only",
    "weights-only",
    "hidden-config",
    "name-with-newline",
    "name-256-chars",
    "missing",
    "trailing-slash-file",
    "nested-folders",
)


# ---------------------------------------------------------------------------------------------
# regexes

REGEXES: dict[str, str] = {
    "unclosed-group": "(q_proj",
    "unclosed-class": "[a-",
    "lone-star": "*",
    "lone-plus": "+q",
    "bad-escape": "q_proj\\",
    "bad-backref": "(a)\\2",
    "bad-named-group": "(?P<x",
    "bad-lookbehind": "(?<=a+)b",
    "repeat-2^32": "a{4294967296}",
    "repeat-huge-range": "a{1,99999999999}",
    "nested-3000": "(" * 3000 + "q" + ")" * 3000,
    "empty": "",
    "only-anchors": "^$",
    "unicode": "q_pröj\u202e",
    "nul": "q\x00proj",
    "newline": "q_proj\nv_proj",
    "bad-flag": "(?z)q",
    "global-flag-late": "q(?i)",
    "catastrophic": "(a|aa)+$",
    "catastrophic-nested": "(a+)+$",
}


def _long_name_peft(root: Path) -> Path:
    """A PEFT adapter with a module whose name is a long run of 'a' (food for backtracking)."""
    mods = dict(DEFAULT_PEFT_MODULES)
    mods["model." + "a" * 40 + ".q_proj"] = (32, 32)
    return good_peft(root / "in", name="ad", modules=mods)


def pattern_config(which: str, regex: str) -> Builder:
    def build(root: Path) -> str:
        value: Any = 2 if which == "rank_pattern" else 16.0
        if "catastrophic" in regex or regex in (REGEXES["catastrophic"], REGEXES["catastrophic-nested"]):
            _long_name_peft(root)
        else:
            good_peft(root / "in", name="ad")
        cfg_path = root / "in" / "ad" / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg[which] = {regex: value}
        cfg_path.write_text(json.dumps(cfg))
        return "in/ad"

    return build


# ---------------------------------------------------------------------------------------------
# archives


def _torch_zip(tensors: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(tensors, buf)
    return buf.getvalue()


def _peft_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        f"{PFX}{Q}.lora_A.weight": torch.randn(4, 32, generator=g),
        f"{PFX}{Q}.lora_B.weight": torch.randn(32, 4, generator=g),
    }


def _rezip(
    data: bytes, edit: Callable[[str, bytes], tuple[str, bytes] | None], compression: int = zipfile.ZIP_STORED
) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(data))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as dst:
        for info in src.infolist():
            new = edit(info.filename, src.read(info))
            if new is not None:
                dst.writestr(new[0], new[1])
    return buf.getvalue()


def _zip_bomb(member: str, size: int) -> bytes:
    buf = io.BytesIO()
    with (
        zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z,
        z.open(member, "w", force_zip64=True) as f,
    ):
        chunk = b"\0" * (1 << 20)
        for _ in range(size >> 20):
            f.write(chunk)
    return buf.getvalue()


def _torch_zip_bomb(size: int) -> bytes:
    """A torch.save zip whose first storage member inflates to `size` bytes of zeros."""
    src = zipfile.ZipFile(io.BytesIO(_torch_zip(_peft_tensors())))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for info in src.infolist():
            if info.filename.endswith("/data/0"):
                with z.open(info.filename, "w", force_zip64=True) as f:
                    chunk = b"\0" * (1 << 20)
                    for _ in range(size >> 20):
                        f.write(chunk)
            else:
                z.writestr(info.filename, src.read(info))
    return buf.getvalue()


def _npz(arrays: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _npz_members(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for k, v in members.items():
            z.writestr(k, v)
    return buf.getvalue()


def _npy(header: str, data: bytes) -> bytes:
    h = header.encode()
    pad = 64 - (10 + len(h) + 1) % 64
    h = h + b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(h)) + h + data


MLX_A, MLX_B = "model.layers.0.self_attn.q_proj.lora_a", "model.layers.0.self_attn.q_proj.lora_b"


def _mlx_arrays() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return {
        MLX_A: rng.standard_normal((32, 4)).astype(np.float32),
        MLX_B: rng.standard_normal((4, 32)).astype(np.float32),
    }


class _Evil:
    def __reduce__(self) -> Any:
        return (os.system, ("touch PWNED",))


ARCHIVES: dict[str, tuple[str, Callable[[], bytes]]] = {  # name -> (file name, bytes)
    "pt-valid": ("adapter_model.bin", lambda: _torch_zip(_peft_tensors())),
    "pt-named-safetensors": ("adapter_model.safetensors", lambda: _torch_zip(_peft_tensors())),
    "pt-truncated": ("adapter_model.bin", lambda: _torch_zip(_peft_tensors())[:700]),
    "pt-no-data-pkl": (
        "adapter_model.bin",
        lambda: _rezip(_torch_zip(_peft_tensors()), lambda n, b: None if n.endswith("data.pkl") else (n, b)),
    ),
    "pt-storage-missing": (
        "adapter_model.bin",
        lambda: _rezip(_torch_zip(_peft_tensors()), lambda n, b: None if "/data/" in n else (n, b)),
    ),
    "pt-storage-short": (
        "adapter_model.bin",
        lambda: _rezip(_torch_zip(_peft_tensors()), lambda n, b: (n, b[:10]) if "/data/" in n else (n, b)),
    ),
    "pt-evil-pickle": (
        "adapter_model.bin",
        lambda: _rezip(
            _torch_zip(_peft_tensors()),
            lambda n, b: (
                (n, __import__("pickle").dumps({"x": _Evil()}, protocol=2)) if n.endswith("data.pkl") else (n, b)
            ),
        ),
    ),
    "pt-legacy-pickle": ("adapter_model.bin", lambda: __import__("pickle").dumps({"x": _Evil()})),
    "pt-zip-bomb": ("adapter_model.bin", lambda: _torch_zip_bomb(1 << 30)),
    "pt-deflated": (
        "adapter_model.bin",
        lambda: _rezip(_torch_zip(_peft_tensors()), lambda n, b: (n, b), zipfile.ZIP_DEFLATED),
    ),
    "npz-valid": ("adapters.npz", lambda: _npz(_mlx_arrays())),
    "npz-strings": ("adapters.npz", lambda: _npz({MLX_A: np.array(["a", "b"]), MLX_B: np.array(["c"])})),
    "npz-objects": ("adapters.npz", lambda: _npz({MLX_A: np.array([{"a": 1}], dtype=object), MLX_B: np.zeros(1)})),
    "npz-complex": (
        "adapters.npz",
        lambda: _npz({MLX_A: np.zeros((32, 4), np.complex64), MLX_B: np.zeros((4, 32), np.complex64)}),
    ),
    "npz-int": ("adapters.npz", lambda: _npz({MLX_A: np.zeros((32, 4), np.int32), MLX_B: np.zeros((4, 32), np.int64)})),
    "npz-bool": ("adapters.npz", lambda: _npz({MLX_A: np.zeros((32, 4), bool), MLX_B: np.zeros((4, 32), bool)})),
    "npz-float64": ("adapters.npz", lambda: _npz({k: v.astype(np.float64) for k, v in _mlx_arrays().items()})),
    "npz-big-endian": ("adapters.npz", lambda: _npz({k: v.astype(">f4") for k, v in _mlx_arrays().items()})),
    "npz-0d": ("adapters.npz", lambda: _npz({MLX_A: np.float32(1), MLX_B: np.float32(2)})),
    "npz-shape-mismatch": (
        "adapters.npz",
        lambda: _npz({MLX_A: np.zeros((32, 4), np.float32), MLX_B: np.zeros((8, 32), np.float32)}),
    ),
    "npz-nan": ("adapters.npz", lambda: _npz({k: np.full_like(v, np.nan) for k, v in _mlx_arrays().items()})),
    "npz-truncated": ("adapters.npz", lambda: _npz(_mlx_arrays())[:300]),
    "npz-not-zip": ("adapters.npz", lambda: b"PK\x03\x04" + b"\0" * 100),
    "npz-member-not-npy": ("adapters.npz", lambda: _npz_members({MLX_A + ".npy": b"hello", MLX_B + ".npy": b"x"})),
    "npz-npy-huge-shape": (
        "adapters.npz",
        lambda: _npz_members(
            {
                MLX_A + ".npy": _npy(
                    "{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776, 1099511627776), }", b"\0" * 64
                ),
                MLX_B + ".npy": _npy("{'descr': '<f4', 'fortran_order': False, 'shape': (4, 32), }", b"\0" * 512),
            }
        ),
    ),
    "npz-npy-bad-header": (
        "adapters.npz",
        lambda: _npz_members(
            {MLX_A + ".npy": _npy("{'descr': __import__('os'), }", b""), MLX_B + ".npy": _npy("not a dict", b"")}
        ),
    ),
    "npz-npy-negative-shape": (
        "adapters.npz",
        lambda: _npz_members(
            {
                MLX_A + ".npy": _npy("{'descr': '<f4', 'fortran_order': False, 'shape': (-4, 32), }", b"\0" * 512),
                MLX_B + ".npy": _npy("{'descr': '<f4', 'fortran_order': False, 'shape': (4, 32), }", b"\0" * 512),
            }
        ),
    ),
    "npz-bomb": ("adapters.npz", lambda: _zip_bomb(MLX_A + ".npy", 1 << 30)),
    "npz-fortran": ("adapters.npz", lambda: _npz({k: np.asfortranarray(v) for k, v in _mlx_arrays().items()})),
}


def archive(name: str) -> Builder:
    def build(root: Path) -> str:
        fname, make = ARCHIVES[name]
        if fname.startswith("adapter_model"):
            d = good_peft(root / "in", name="ad")
            (d / "adapter_model.safetensors").unlink()
            write(d / fname, make())
            return "in/ad"
        write(root / "in" / "mlx" / fname, make())
        if name != "npz-valid":
            write(
                root / "in" / "mlx" / "adapter_config.json",
                json.dumps(
                    {
                        "fine_tune_type": "lora",
                        "num_layers": 1,
                        "lora_parameters": {"rank": 4, "scale": 2.0, "keys": ["self_attn.q_proj"]},
                    }
                ),
            )
        return f"in/mlx/{fname}"

    return build


# ---------------------------------------------------------------------------------------------
# GGUF

GGUF_T = {
    "u8": 0,
    "i8": 1,
    "u16": 2,
    "i16": 3,
    "u32": 4,
    "i32": 5,
    "f32": 6,
    "bool": 7,
    "string": 8,
    "array": 9,
    "u64": 10,
    "i64": 11,
    "f64": 12,
}


def g_str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def g_kv(key: str | bytes, typ: str, value: Any) -> bytes:
    out = g_str(key) + struct.pack("<I", GGUF_T[typ])
    if typ == "string":
        return out + g_str(value)
    if typ == "f32":
        return out + struct.pack("<f", value)
    if typ == "u32":
        return out + struct.pack("<I", value)
    raise ValueError(typ)


def g_tensor(name: str | bytes, dims: list[int], ttype: int, offset: int) -> bytes:
    return (
        g_str(name)
        + struct.pack("<I", len(dims))
        + b"".join(struct.pack("<Q", d) for d in dims)
        + struct.pack("<II", ttype, 0)[:4]
        + struct.pack("<Q", offset)
    )


def gguf_file(
    *,
    magic: bytes = b"GGUF",
    version: int = 3,
    n_tensors: int | None = None,
    n_kv: int | None = None,
    kvs: list[bytes] | None = None,
    tensors: list[bytes] | None = None,
    data: bytes | None = None,
    align: int = 32,
) -> bytes:
    """A GGUF LoRA adapter (blk.0.attn_q with rank 4 over 32 x 32) with any field overridden."""
    if kvs is None:
        kvs = [
            g_kv("general.architecture", "string", "llama"),
            g_kv("general.type", "string", "adapter"),
            g_kv("adapter.type", "string", "lora"),
            g_kv("adapter.lora.alpha", "f32", 8.0),
        ]
    if tensors is None:
        tensors = [
            g_tensor("blk.0.attn_q.weight.lora_a", [32, 4], 0, 0),
            g_tensor("blk.0.attn_q.weight.lora_b", [4, 32], 0, 512),
        ]
    if data is None:
        data = np.random.default_rng(0).standard_normal(256).astype(np.float32).tobytes()
    head = magic + struct.pack("<I", version) + struct.pack("<Q", len(tensors) if n_tensors is None else n_tensors)
    head += struct.pack("<Q", len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(tensors)
    head += b"\0" * ((-len(head)) % align)
    return head + data


GGUF: dict[str, Callable[[], bytes]] = {
    "valid": lambda: gguf_file(),
    "bad-magic": lambda: gguf_file(magic=b"GGUX"),
    "magic-lowercase": lambda: gguf_file(magic=b"gguf"),
    "version-0": lambda: gguf_file(version=0),
    "version-1": lambda: gguf_file(version=1),
    "version-2": lambda: gguf_file(version=2),
    "version-99": lambda: gguf_file(version=99),
    "version-max": lambda: gguf_file(version=0xFFFFFFFF),
    "tensor-count-2^60": lambda: gguf_file(n_tensors=1 << 60),
    "tensor-count-max": lambda: gguf_file(n_tensors=(1 << 64) - 1),
    "kv-count-2^60": lambda: gguf_file(n_kv=1 << 60),
    "kv-count-extra": lambda: gguf_file(n_kv=5),
    "key-length-2^60": lambda: gguf_file(kvs=[struct.pack("<Q", 1 << 60) + b"general.architecture"]),
    "value-type-99": lambda: gguf_file(kvs=[g_str("general.architecture") + struct.pack("<I", 99) + b"\0" * 8]),
    "array-count-2^60": lambda: gguf_file(
        kvs=[g_str("tokenizer.tokens") + struct.pack("<II", 9, 4) + struct.pack("<Q", 1 << 60) + b"\0" * 16]
    ),
    "array-of-arrays": lambda: gguf_file(
        kvs=[
            g_str("x.arr")
            + struct.pack("<II", 9, 9)
            + struct.pack("<Q", 1)
            + struct.pack("<I", 9)
            + struct.pack("<Q", 1)
            + struct.pack("<I", 4)
            + struct.pack("<Q", 1)
            + b"\0\0\0\0"
        ]
    ),
    "string-length-2^60": lambda: gguf_file(
        kvs=[g_str("general.architecture") + struct.pack("<I", 8) + struct.pack("<Q", 1 << 60) + b"llama"]
    ),
    "non-utf8-key": lambda: gguf_file(kvs=[g_kv(b"general.\xff\xfe", "string", "llama")]),
    "non-utf8-value": lambda: gguf_file(
        kvs=[g_kv("general.architecture", "string", b"ll\xffama"), g_kv("adapter.lora.alpha", "f32", 8.0)]
    ),
    "non-utf8-tensor-name": lambda: gguf_file(
        tensors=[
            g_tensor(b"blk.0.\xff.weight.lora_a", [32, 4], 0, 0),
            g_tensor("blk.0.attn_q.weight.lora_b", [4, 32], 0, 512),
        ]
    ),
    "alpha-string": lambda: gguf_file(kvs=[g_kv("adapter.lora.alpha", "string", "lots")]),
    "alpha-nan": lambda: gguf_file(kvs=[g_kv("adapter.lora.alpha", "f32", float("nan"))]),
    "type-model": lambda: gguf_file(kvs=[g_kv("general.type", "string", "model")]),
    "n-dims-100": lambda: gguf_file(tensors=[g_tensor("blk.0.attn_q.weight.lora_a", [1] * 100, 0, 0)]),
    "dims-2^60": lambda: gguf_file(
        tensors=[
            g_tensor("blk.0.attn_q.weight.lora_a", [1 << 60, 1 << 60], 0, 0),
            g_tensor("blk.0.attn_q.weight.lora_b", [4, 32], 0, 512),
        ]
    ),
    "dims-zero": lambda: gguf_file(
        tensors=[
            g_tensor("blk.0.attn_q.weight.lora_a", [0, 4], 0, 0),
            g_tensor("blk.0.attn_q.weight.lora_b", [4, 0], 0, 512),
        ]
    ),
    "tensor-type-99": lambda: gguf_file(
        tensors=[
            g_tensor("blk.0.attn_q.weight.lora_a", [32, 4], 99, 0),
            g_tensor("blk.0.attn_q.weight.lora_b", [4, 32], 0, 512),
        ]
    ),
    "tensor-type-i32": lambda: gguf_file(
        tensors=[
            g_tensor("blk.0.attn_q.weight.lora_a", [32, 4], 26, 0),
            g_tensor("blk.0.attn_q.weight.lora_b", [4, 32], 26, 512),
        ]
    ),
    "tensor-type-f64": lambda: gguf_file(
        tensors=[
            g_tensor("blk.0.attn_q.weight.lora_a", [32, 4], 28, 0),
            g_tensor("blk.0.attn_q.weight.lora_b", [4, 32], 28, 1024),
        ],
        data=b"\0" * 2048,
    ),
    "tensor-offset-beyond": lambda: gguf_file(
        tensors=[
            g_tensor("blk.0.attn_q.weight.lora_a", [32, 4], 0, 1 << 40),
            g_tensor("blk.0.attn_q.weight.lora_b", [4, 32], 0, 512),
        ]
    ),
    "tensor-offset-unaligned": lambda: gguf_file(
        tensors=[
            g_tensor("blk.0.attn_q.weight.lora_a", [32, 4], 0, 3),
            g_tensor("blk.0.attn_q.weight.lora_b", [4, 32], 0, 512),
        ]
    ),
    "tensors-overlap": lambda: gguf_file(
        tensors=[
            g_tensor("blk.0.attn_q.weight.lora_a", [32, 4], 0, 0),
            g_tensor("blk.0.attn_q.weight.lora_b", [4, 32], 0, 0),
        ]
    ),
    "duplicate-tensor": lambda: gguf_file(
        tensors=[
            g_tensor("blk.0.attn_q.weight.lora_a", [32, 4], 0, 0),
            g_tensor("blk.0.attn_q.weight.lora_a", [32, 4], 0, 512),
        ]
    ),
    "alignment-zero": lambda: gguf_file(kvs=[g_kv("general.alignment", "u32", 0)]),
    "alignment-three": lambda: gguf_file(kvs=[g_kv("general.alignment", "u32", 3)]),
    "alignment-string": lambda: gguf_file(kvs=[g_kv("general.alignment", "string", "32")]),
    "rank-mismatch": lambda: gguf_file(
        tensors=[
            g_tensor("blk.0.attn_q.weight.lora_a", [32, 4], 0, 0),
            g_tensor("blk.0.attn_q.weight.lora_b", [8, 32], 0, 512),
        ],
        data=b"\0" * 2048,
    ),
    "truncated-header": lambda: gguf_file()[:30],
    "truncated-data": lambda: gguf_file()[:-600],
    "nan-data": lambda: gguf_file(data=np.full(256, np.nan, np.float32).tobytes()),
}


def gguf_input(name: str) -> Builder:
    def build(root: Path) -> str:
        write(root / "in" / "adapter.gguf", GGUF[name]())
        return "in/adapter.gguf"

    return build


# ---------------------------------------------------------------------------------------------
# tensors: shapes, ranks, values

QA, QB = f"{PFX}{Q}.lora_A.weight", f"{PFX}{Q}.lora_B.weight"


def peft_with(extra: dict[str, torch.Tensor], drop: tuple[str, ...] = (), **kw: Any) -> Builder:
    def build(root: Path) -> str:
        good_peft(root / "in", name="ad", drop=drop, extra_tensors=extra, **kw)
        return "in/ad"

    return build


def kohya_with(extra: dict[str, torch.Tensor], drop: tuple[str, ...] = (), **kw: Any) -> Builder:
    def build(root: Path) -> str:
        good_kohya(root / "in", name="adapter.safetensors", drop=drop, extra_tensors=extra, **kw)
        return "in/adapter.safetensors"

    return build


def lyco(tensors: dict[str, torch.Tensor]) -> Builder:
    def build(root: Path) -> str:
        (root / "in").mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(root / "in" / "adapter.safetensors"))
        return "in/adapter.safetensors"

    return build


NAN, INF = float("nan"), float("inf")
S = "lora_unet_down_blocks_0_attentions_0_proj_in"


def _full(shape: tuple[int, ...], v: float) -> torch.Tensor:
    return torch.full(shape, v)


TENSORS: dict[str, Builder] = {
    "rank-mismatch": peft_with({QB: torch.zeros(32, 8)}, drop=(QB,)),
    "out-mismatch": peft_with({QB: torch.zeros(7, 4)}, drop=(QB,)),
    "in-mismatch-vs-other": kohya_with({UP: torch.zeros(32, 4), DOWN: torch.zeros(4, 31)}, drop=(UP, DOWN)),
    "down-1d": peft_with({QA: torch.zeros(4)}, drop=(QA,)),
    "down-3d": peft_with({QA: torch.zeros(4, 32, 2)}, drop=(QA,)),
    "down-0d": peft_with({QA: torch.tensor(1.0)}, drop=(QA,)),
    "rank-zero": peft_with({QA: torch.zeros(0, 32), QB: torch.zeros(32, 0)}, drop=(QA, QB)),
    "rank-above-dims": peft_with({QA: torch.randn(64, 32), QB: torch.randn(32, 64)}, drop=(QA, QB)),
    "empty-dims": peft_with({QA: torch.zeros(4, 0), QB: torch.zeros(0, 4)}, drop=(QA, QB)),
    "nan-down": peft_with({}, nan=True),
    "inf-down": peft_with({}, inf=True),
    "nan-up": peft_with({QB: _full((32, 4), NAN)}, drop=(QB,)),
    "huge-values-fp16": peft_with(
        {QB: _full((32, 4), 60000.0).half(), QA: _full((4, 32), 60000.0).half()}, drop=(QA, QB)
    ),
    "subnormal-values": peft_with({QB: _full((32, 4), 1e-45), QA: _full((4, 32), 1e-45)}, drop=(QA, QB)),
    "zero-up": peft_with({}, zero_up=True),
    "bf16": peft_with({}, dtype="bfloat16"),
    "fp8": peft_with({QA: torch.zeros(4, 32).to(torch.float8_e4m3fn)}, drop=(QA,)),
    "float64": peft_with({}, dtype="float64"),
    "int-factors": peft_with(
        {QA: torch.ones(4, 32, dtype=torch.int32), QB: torch.ones(32, 4, dtype=torch.int64)}, drop=(QA, QB)
    ),
    "bool-factors": peft_with({QA: torch.ones(4, 32, dtype=torch.bool)}, drop=(QA,)),
    "mixed-dtypes": peft_with({QA: torch.randn(4, 32).half(), QB: torch.randn(32, 4).double()}, drop=(QA, QB)),
    "alpha-nan-kohya": kohya_with({}, alpha=NAN),
    "alpha-inf-kohya": kohya_with({}, alpha=INF),
    "alpha-negative-kohya": kohya_with({}, alpha=-4.0),
    "alpha-zero-kohya": kohya_with({}, alpha=0.0),
    "alpha-1e38-kohya": kohya_with({}, alpha=3e38),
    "alpha-vector-kohya": kohya_with({ALPHA: torch.ones(4)}, drop=(ALPHA,)),
    "alpha-matrix-kohya": kohya_with({ALPHA: torch.ones(4, 4)}, drop=(ALPHA,)),
    "alpha-int-kohya": kohya_with({ALPHA: torch.tensor(4, dtype=torch.int64)}, drop=(ALPHA,)),
    "alpha-bool-kohya": kohya_with({ALPHA: torch.tensor(True)}, drop=(ALPHA,)),
    "alpha-empty-kohya": kohya_with({ALPHA: torch.zeros(0)}, drop=(ALPHA,)),
    "bias-nan": peft_with({f"{PFX}{Q}.lora_B.bias": _full((32,), NAN)}),
    "bias-wrong-length": peft_with({f"{PFX}{Q}.lora_B.bias": torch.zeros(7)}),
    "magnitude-nan": peft_with(
        {f"{PFX}{Q}.lora_magnitude_vector.weight": _full((32,), NAN)}, config={"use_dora": True}
    ),
    "magnitude-wrong-shape": peft_with(
        {f"{PFX}{Q}.lora_magnitude_vector.weight": torch.ones(5)}, config={"use_dora": True}
    ),
    "magnitude-zero": peft_with({f"{PFX}{Q}.lora_magnitude_vector.weight": torch.zeros(32)}),
    "embedding-wrong": peft_with(
        {
            f"{PFX}model.embed_tokens.lora_embedding_A": torch.ones(4, 10),
            f"{PFX}model.embed_tokens.lora_embedding_B": torch.ones(7, 3),
        }
    ),
    "modules-to-save-int64": peft_with(
        {f"{PFX}lm_head.modules_to_save.default.weight": torch.ones(8, 4, dtype=torch.int64)},
        config={"modules_to_save": ["lm_head"]},
    ),
    "modules-to-save-nan": peft_with(
        {f"{PFX}lm_head.modules_to_save.default.weight": _full((8, 4), NAN)}, config={"modules_to_save": ["lm_head"]}
    ),
    "dora-scale-nan-kohya": kohya_with({f"{KQ}.dora_scale": _full((32, 1), NAN)}),
    "diff-b-nan-kohya": kohya_with({f"{KQ}.diff_b": _full((32,), NAN)}),
    "conv-kernel-mismatch": lyco(
        {
            f"{S}.lora_down.weight": torch.randn(4, 8, 3, 3),
            f"{S}.lora_up.weight": torch.randn(16, 4, 3, 3),
            f"{S}.alpha": torch.tensor(4.0),
        }
    ),
    "loha-nan": lyco(
        {
            f"{S}.hada_w1_a": _full((32, 4), NAN),
            f"{S}.hada_w1_b": torch.ones(4, 32),
            f"{S}.hada_w2_a": torch.ones(32, 4),
            f"{S}.hada_w2_b": torch.ones(4, 32),
            f"{S}.alpha": torch.tensor(4.0),
        }
    ),
    "loha-shape-mismatch": lyco(
        {
            f"{S}.hada_w1_a": torch.ones(32, 4),
            f"{S}.hada_w1_b": torch.ones(4, 32),
            f"{S}.hada_w2_a": torch.ones(16, 4),
            f"{S}.hada_w2_b": torch.ones(4, 8),
            f"{S}.alpha": torch.tensor(4.0),
        }
    ),
    "loha-missing-part": lyco(
        {f"{S}.hada_w1_a": torch.ones(32, 4), f"{S}.hada_w1_b": torch.ones(4, 32), f"{S}.alpha": torch.tensor(4.0)}
    ),
    "lokr-nan": lyco(
        {f"{S}.lokr_w1": _full((4, 4), NAN), f"{S}.lokr_w2": torch.ones(8, 8), f"{S}.alpha": torch.tensor(4.0)}
    ),
    "lokr-zero-dim": lyco({f"{S}.lokr_w1": torch.ones(0, 4), f"{S}.lokr_w2": torch.ones(8, 8)}),
    "lokr-1d": lyco({f"{S}.lokr_w1": torch.ones(4), f"{S}.lokr_w2": torch.ones(8, 8)}),
    "tucker-bad-mid": lyco(
        {
            f"{S}.lora_down.weight": torch.randn(4, 8, 1, 1),
            f"{S}.lora_mid.weight": torch.randn(4, 5, 3, 3),
            f"{S}.lora_up.weight": torch.randn(16, 4, 1, 1),
        }
    ),
    "diff-nan": lyco({f"{S}.diff": _full((16, 8), NAN), f"{S}.diff_b": torch.zeros(16)}),
    "diff-alone-int": lyco({f"{S}.diff": torch.ones(16, 8, dtype=torch.int32)}),
    "norm-diff-inf": lyco({f"{S}.w_norm": _full((16,), INF), f"{S}.b_norm": torch.zeros(16)}),
    "mixed-formats": lyco(
        {
            f"{S}.lora_down.weight": torch.randn(4, 8),
            f"{S}.lora_up.weight": torch.randn(16, 4),
            f"{PFX}{Q}.lora_A.weight": torch.randn(4, 32),
            f"{PFX}{Q}.lora_B.weight": torch.randn(32, 4),
        }
    ),
}


# ---------------------------------------------------------------------------------------------
# the token planted in inputs


def token_inputs() -> dict[str, Builder]:
    return {
        "token-as-base-model": lambda r: str(
            good_peft(r / "in", name="ad", config={"base_model_name_or_path": FAKE_TOKEN}).relative_to(r)
        ),
        "token-in-metadata": lambda r: str(
            good_peft(
                r / "in", name="ad", metadata={"format": "pt", "hf": FAKE_TOKEN, "note": f"token={FAKE_TOKEN}"}
            ).relative_to(r)
        ),
        "token-in-kohya-metadata": lambda r: str(
            good_kohya(
                r / "in",
                name="adapter.safetensors",
                metadata={"ss_training_comment": FAKE_TOKEN, "modelspec.title": f"Bearer {FAKE_TOKEN}"},
            ).relative_to(r)
        ),
        "token-in-config-key": lambda r: str(good_peft(r / "in", name="ad", config={FAKE_TOKEN: 1}).relative_to(r)),
        "token-in-bad-config": lambda r: (
            write(good_peft(r / "in", name="ad") / "adapter_config.json", f'{{"r": "{FAKE_TOKEN}"}}'),
            "in/ad",
        )[1],
        "token-in-pattern": lambda r: str(
            good_peft(r / "in", name="ad", config={"rank_pattern": {FAKE_TOKEN + "(": 2}}).relative_to(r)
        ),
        "token-environ-as-config": special_in_peft("adapter_config.json", "link-proc-environ"),
        "token-environ-as-weights": special_in_peft("adapter_model.safetensors", "link-proc-environ"),
    }


# ---------------------------------------------------------------------------------------------
# adapter inputs x adapter commands


def adapter_inputs() -> Iterator[tuple[str, str, Builder]]:
    """(group, name, builder) for every adapter-shaped hostile input."""
    for name in HEADERS:
        yield "header", f"kohya-{name}", header_file(name)
    for name in (
        "truncated-in-data",
        "length-huge",
        "offsets-overlapping",
        "dtype-unknown",
        "not-utf8",
        "duplicate-keys",
        "nested-list-100k",
        "shape-huge",
        "lone-surrogate-key",
        "metadata-number",
    ):
        yield "header", f"peft-{name}", header_in_peft(name)
    for name in CONFIG_VALUES:
        yield "config", name, config_values(name)
    for name in CONFIG_TEXTS:
        yield "config", f"text-{name}", config_text(name)
    for member in ("adapter_config.json", "adapter_model.safetensors"):
        for how in SPECIAL_KINDS:
            yield "special", f"{member}-{how}", special_in_peft(member, how)
    for how in (
        "fifo",
        "socket",
        "directory",
        "empty",
        "dangling-link",
        "link-loop",
        "link-dev-zero",
        "link-dev-null",
        "link-out",
        "link-dir-out",
    ):
        yield "special", f"path-{how}", special_path(how)
    for kind in ODD_FOLDERS:
        yield "special", kind, odd_folder(kind)
    for rname, regex in REGEXES.items():
        yield "regex", f"rank-pattern-{rname}", pattern_config("rank_pattern", regex)
        yield "regex", f"alpha-pattern-{rname}", pattern_config("alpha_pattern", regex)
    for name in ARCHIVES:
        yield "archive", name, archive(name)
    for name in GGUF:
        yield "gguf", name, gguf_input(name)
    for name, b in TENSORS.items():
        yield "tensor", name, b
    for name, b in token_inputs().items():
        yield "token", name, b


def _out_for(path: str, dir_out: bool | None = None) -> str:
    if dir_out is None:
        dir_out = not path.endswith(".safetensors")
    return "out" if dir_out else "out.safetensors"


@templated
def _helpers(root: Path) -> tuple[str, str]:
    """A valid PEFT adapter and the base it fits, beside the inputs (they are inputs too)."""
    good_peft(root / "ok", name="good")
    llama_base(root / "ok", name="base")
    return "ok/good", "ok/base"


AdapterCommand = Callable[[Path, str], list[str]]


def _with_helpers(fn: Callable[[str, str, str], list[str]]) -> AdapterCommand:
    def make(root: Path, a: str) -> list[str]:
        good, base = _helpers(root)
        return fn(a, good, base)

    return make


ADAPTER_COMMANDS: dict[str, AdapterCommand] = {
    "inspect": lambda r, a: ["inspect", a],
    "inspect-json": lambda r, a: ["inspect", a, "--json", "--modules"],
    "inspect-spectrum": lambda r, a: ["inspect", a, "--spectrum", "--device", "cpu"],
    "validate": lambda r, a: ["validate", a, "--json"],
    "rescale": lambda r, a: ["rescale", a, "-o", _out_for(a), "--factor", "0.5"],
    "resize": lambda r, a: ["resize", a, "-o", _out_for(a), "-r", "2", "--device", "cpu"],
    "convert": lambda r, a: ["convert", a, "--to", "kohya", "-o", "out.safetensors"],
    "convert-peft": lambda r, a: ["convert", a, "--to", "peft", "-o", "out"],
    "combine": _with_helpers(
        lambda a, good, base: ["combine", a, good, "-o", "out", "--format", "peft", "--device", "cpu"]
    ),
    "merge": _with_helpers(lambda a, good, base: ["merge", base, a, "-o", "out", "--device", "cpu"]),
    "verify": _with_helpers(lambda a, good, base: ["verify", base, "--base", base, a, "--device", "cpu"]),
    "diff": _with_helpers(lambda a, good, base: ["diff", a, good, "--device", "cpu"]),
}


def _adapter_case(group: str, name: str, builder: Builder, cmd: str, suite: bool) -> Case:
    make = ADAPTER_COMMANDS[cmd]

    def build(root: Path) -> list[str]:
        a = builder(root)
        return make(root, a)

    return Case(f"{group}/{name}/{cmd}", group, cmd.split("-")[0], build, suite)


# The suite runs each adapter input through one reading and one writing command, taken in turn, so
# every command meets every group within the suite's time; the tally's --all runs every pair.
READERS = ("inspect", "validate", "inspect-json", "diff", "inspect-spectrum", "verify")
WRITERS = ("rescale", "resize", "convert", "merge", "convert-peft", "combine")


# ---------------------------------------------------------------------------------------------
# bases and fine-tuned models


def _base_variant(kind: str) -> Callable[[Path, str], None]:
    """Make the base folder at root/name hostile in one way."""

    def edit(root: Path, name: str) -> None:
        d = root / name
        w = d / "model.safetensors"
        shapes = {f"{m}.weight": s for m, s in DEFAULT_PEFT_MODULES.items()}
        if kind == "config-deep-100k":
            write(d / "config.json", b"[" * 100_000 + b"]" * 100_000)
        elif kind == "config-not-json":
            write(d / "config.json", b"{nope")
        elif kind == "config-wrong-types":
            write(
                d / "config.json",
                json.dumps(
                    {
                        "architectures": "LlamaForCausalLM",
                        "num_attention_heads": "x",
                        "hidden_size": [1],
                        "model_type": 5,
                    }
                ),
            )
        elif kind == "config-fifo":
            _fifo(d / "config.json")
        elif kind == "config-link-environ":
            (d / "config.json").symlink_to("/proc/self/environ")
        elif kind == "extra-file-link-out":
            write(root / "outside" / "secret.txt", "secret outside the base\n")
            (d / "notes.txt").symlink_to("../../outside/secret.txt" if "/" in name else "../outside/secret.txt")
        elif kind == "extra-file-link-environ":
            (d / "notes.txt").symlink_to("/proc/self/environ")
        elif kind == "extra-fifo":
            _fifo(d / "tokenizer.json")
        elif kind == "extra-dir-loop":
            (d / "sub").mkdir()
            (d / "sub" / "loop").symlink_to("..")
        elif kind in ("bool-weights", "int-weights", "float64-weights", "fp16-weights", "nan-weights"):
            dt = {
                "bool-weights": torch.bool,
                "int-weights": torch.int32,
                "float64-weights": torch.float64,
                "fp16-weights": torch.float16,
                "nan-weights": torch.float32,
            }[kind]
            ts = {k: (torch.full(s, NAN) if kind == "nan-weights" else torch.ones(s).to(dt)) for k, s in shapes.items()}
            save_file(ts, str(w))
        elif kind == "shape-mismatch":
            save_file({k: torch.zeros(s[0] + 1, s[1]) for k, s in shapes.items()}, str(w))
        elif kind == "1d-weights":
            save_file({k: torch.zeros(s[0] * s[1]) for k, s in shapes.items()}, str(w))
        elif kind == "missing-weight":
            save_file({k: torch.zeros(s) for k, s in list(shapes.items())[1:]}, str(w))
        elif kind in HEADERS:
            write(w, HEADERS[kind]())
        elif kind == "index-dotdot":
            w.rename(d / "model-00001-of-00001.safetensors")
            write(
                d / "model.safetensors.index.json",
                json.dumps({"metadata": {}, "weight_map": {k: "../../../etc/passwd" for k in shapes}}),
            )
        elif kind == "index-absolute":
            write(
                d / "model.safetensors.index.json",
                json.dumps({"metadata": {}, "weight_map": {k: "/etc/passwd" for k in shapes}}),
            )
        elif kind == "index-not-json":
            write(d / "model.safetensors.index.json", b"{")
        elif kind == "index-deep":
            write(d / "model.safetensors.index.json", b'{"weight_map":' + b"[" * 100_000 + b"]" * 100_000 + b"}")
        elif kind == "index-wrong-types":
            write(d / "model.safetensors.index.json", json.dumps({"weight_map": [1, 2]}))
        elif kind == "index-missing-shard":
            write(
                d / "model.safetensors.index.json",
                json.dumps({"metadata": {}, "weight_map": {k: "model-00009-of-00009.safetensors" for k in shapes}}),
            )
        elif kind == "index-fifo":
            _fifo(d / "model.safetensors.index.json")
        elif kind == "weights-fifo":
            _fifo(w)
        elif kind == "weights-link-out":
            write(root / "outside" / "w.safetensors", w.read_bytes())
            w.unlink()
            w.symlink_to(os.path.relpath(root / "outside" / "w.safetensors", d))
        elif kind == "empty-folder":
            w.unlink()
        else:
            raise ValueError(kind)

    return edit


BASE_KINDS = (
    "config-deep-100k",
    "config-not-json",
    "config-wrong-types",
    "config-fifo",
    "config-link-environ",
    "extra-file-link-out",
    "extra-file-link-environ",
    "extra-fifo",
    "extra-dir-loop",
    "bool-weights",
    "int-weights",
    "float64-weights",
    "fp16-weights",
    "nan-weights",
    "shape-mismatch",
    "1d-weights",
    "missing-weight",
    "truncated-in-data",
    "length-huge",
    "offsets-overlapping",
    "dtype-unknown",
    "not-utf8",
    "duplicate-keys",
    "shape-huge",
    "index-dotdot",
    "index-absolute",
    "index-not-json",
    "index-deep",
    "index-wrong-types",
    "index-missing-shard",
    "index-fifo",
    "weights-fifo",
    "weights-link-out",
    "empty-folder",
)

BASE_COMMANDS: dict[str, Callable[[str, str, str], list[str]]] = {  # (hostile base, good adapter, good base)
    "merge": lambda b, a, ok: ["merge", b, a, "-o", "out", "--device", "cpu"],
    "merge-report": lambda b, a, ok: ["merge", b, a, "-o", "out", "--report", "report.json", "--device", "cpu"],
    "verify-as-base": lambda b, a, ok: ["verify", ok, "--base", b, a, "--device", "cpu"],
    "verify-as-merged": lambda b, a, ok: ["verify", b, "--base", ok, a, "--device", "cpu"],
    "extract-as-base": lambda b, a, ok: ["extract", b, ok, "-o", "out", "-r", "2", "--device", "cpu"],
    "extract-as-tuned": lambda b, a, ok: ["extract", ok, b, "-o", "out", "-r", "2", "--device", "cpu"],
    "validate-base": lambda b, a, ok: ["validate", a, "--base", b],
    "convert-base": lambda b, a, ok: ["convert", a, "--to", "kohya", "--base", b, "-o", "out.safetensors"],
}


def _base_case(kind: str, cmd: str, suite: bool, make_base: Callable[[Path], None]) -> Case:
    def build(root: Path) -> list[str]:
        good, ok = _helpers(root)
        make_base(root)
        return BASE_COMMANDS[cmd]("in/base", good, ok)

    return Case(f"base/{kind}/{cmd}", "base", cmd.split("-")[0], build, suite)


# ---------------------------------------------------------------------------------------------
# options


@templated
def _kohya_helper(root: Path) -> str:
    good_kohya(root / "ok", name="k.safetensors")
    return "ok/k.safetensors"


def _opt(argv: Callable[[str, str, str], list[str]]) -> Callable[[Path], list[str]]:
    """argv(good adapter, good base, good kohya file)."""

    def build(root: Path) -> list[str]:
        good, base = _helpers(root)
        return argv(good, base, _kohya_helper(root))

    return build


OPTIONS: dict[str, Callable[[str, str, str], list[str]]] = {}


def _add_options() -> None:
    o = OPTIONS
    for v in ("0", "-1", "99999", "2147483648", "99999999999999999999", "x", ""):
        o[f"resize/rank-{v or 'empty'}"] = lambda a, b, k, v=v: ["resize", a, "-o", "out", "-r", v]
        o[f"convert/rank-{v or 'empty'}"] = lambda a, b, k, v=v: [
            "convert",
            k,
            "--to",
            "kohya",
            "-o",
            "o.safetensors",
            "-r",
            v,
        ]
    for m in ("sv_fro", "sv_ratio", "sv_cumulative", "max_error"):
        o[f"resize/{m}-no-threshold"] = lambda a, b, k, m=m: ["resize", a, "-o", "out", "--method", m]
        for t in ("nan", "inf", "-inf", "-1", "0", "1e308", "2"):
            o[f"resize/{m}-threshold-{t}"] = lambda a, b, k, m=m, t=t: [
                "resize",
                a,
                "-o",
                "out",
                "--method",
                m,
                "--threshold",
                t,
            ]
    o["resize/threshold-without-method"] = lambda a, b, k: ["resize", a, "-o", "out", "--threshold", "0.5"]
    o["resize/conv-rank-0"] = lambda a, b, k: ["resize", k, "-o", "out.safetensors", "--conv-rank", "0", "-r", "2"]
    o["resize/conv-rank-negative"] = lambda a, b, k: [
        "resize",
        k,
        "-o",
        "out.safetensors",
        "--conv-rank",
        "-3",
        "-r",
        "2",
    ]
    for fmt in ("kohya", "diffusers", "mlx", "gguf"):
        o[f"resize/format-{fmt}"] = lambda a, b, k, fmt=fmt: ["resize", a, "-o", "out", "-r", "2", "--format", fmt]
        o[f"rescale/kohya-to-{fmt}"] = lambda a, b, k, fmt=fmt: [
            "rescale",
            k,
            "-o",
            "out",
            "--factor",
            "2",
            "--format",
            fmt,
        ]
        o[f"convert/to-{fmt}-dir"] = lambda a, b, k, fmt=fmt: ["convert", a, "--to", fmt, "-o", "out"]
        o[f"convert/to-{fmt}-file"] = lambda a, b, k, fmt=fmt: ["convert", a, "--to", fmt, "-o", "out.safetensors"]
    for dev in ("cuda:7", "bogus", "mps", "cpu:0", "cuda:-1", ""):
        o[f"resize/device-{dev or 'empty'}"] = lambda a, b, k, dev=dev: [
            "resize",
            a,
            "-o",
            "out",
            "-r",
            "2",
            "--device",
            dev,
        ]
        o[f"merge/device-{dev or 'empty'}"] = lambda a, b, k, dev=dev: ["merge", b, a, "-o", "out", "--device", dev]
    for f in ("nan", "inf", "-inf", "1e308", "-1e308", "0", "-0", "1e-320", "x", "3.4e38"):
        o[f"rescale/factor-{f}"] = lambda a, b, k, f=f: ["rescale", a, "-o", "out", "--factor", f]
        o[f"rescale/alpha-{f}"] = lambda a, b, k, f=f: ["rescale", a, "-o", "out", "--alpha", f]
        o[f"rescale/kohya-factor-{f}"] = lambda a, b, k, f=f: ["rescale", k, "-o", "out.safetensors", "--factor", f]
    o["rescale/two-modes"] = lambda a, b, k: ["rescale", a, "-o", "out", "--factor", "2", "--normalize"]
    o["rescale/no-mode"] = lambda a, b, k: ["rescale", a, "-o", "out"]
    o["rescale/both-rslora"] = lambda a, b, k: ["rescale", a, "-o", "out", "--to-rslora", "--from-rslora"]
    o["rescale/from-rslora-not-rslora"] = lambda a, b, k: ["rescale", a, "-o", "out", "--from-rslora"]
    for mw in (
        "(=2",
        "q_proj=x",
        "q_proj=nan",
        "q_proj=inf",
        "=1",
        "q_proj",
        "q_proj=1,",
        ",",
        "a{4294967296}=1",
        "(" * 3000 + "q" + ")" * 3000 + "=1",
        "q_proj=1e308",
        "[=1",
        "q_proj=-1e308",
    ):
        for cmd in ("rescale", "merge", "combine", "verify"):
            key = f"{cmd}/module-weights-{mw[:30]}"
            if cmd == "rescale":
                o[key] = lambda a, b, k, mw=mw: ["rescale", a, "-o", "out", "--module-weights", mw]
            elif cmd == "merge":
                o[key] = lambda a, b, k, mw=mw: ["merge", b, a, "-o", "out", "--module-weights", mw]
            elif cmd == "combine":
                o[key] = lambda a, b, k, mw=mw: ["combine", a, a, "-o", "out", "--module-weights", mw]
            else:
                o[key] = lambda a, b, k, mw=mw: ["verify", b, "--base", b, a, "--module-weights", mw]
    for bl in (
        "bogus:1",
        "sd15:1,2",
        "sd15:nan" + ",1" * 16,
        "sd15:",
        ":",
        "sdxl:" + ",".join(["1e308"] * 12),
        "flux:" + ",".join(["x"] * 57),
        "sd15:" + ",".join(["1"] * 10000),
    ):
        o[f"rescale/blocks-{bl[:20]}"] = lambda a, b, k, bl=bl: ["rescale", k, "-o", "out.safetensors", "--blocks", bl]
        o[f"merge/blocks-{bl[:20]}"] = lambda a, b, k, bl=bl: ["merge", b, a, "-o", "out", "--blocks", bl]
    for rx in REGEXES.values():
        o[f"resize/modules-{rx[:30]!r}"] = lambda a, b, k, rx=rx: ["resize", a, "-o", "out", "-r", "2", "--modules", rx]
        o[f"rescale/modules-{rx[:30]!r}"] = lambda a, b, k, rx=rx: [
            "rescale",
            a,
            "-o",
            "out",
            "--factor",
            "2",
            "--modules",
            rx,
        ]
        o[f"inspect/modules-{rx[:30]!r}"] = lambda a, b, k, rx=rx: ["inspect", a, "--modules", rx]
        o[f"extract/modules-{rx[:30]!r}"] = lambda a, b, k, rx=rx: [
            "extract",
            b,
            b,
            "-o",
            "out",
            "-r",
            "2",
            "--modules",
            rx,
        ]
    for w in ("nan,1", "1", "1,2,3", "a,b", "1e308,1e308", "inf,1", "", ",", "1,,2", "0,0", "-1e308,1e308"):
        o[f"combine/weights-{w or 'empty'}"] = lambda a, b, k, w=w: ["combine", a, a, "-o", "out", "--weights", w]
        o[f"merge/weights-{w or 'empty'}"] = lambda a, b, k, w=w: ["merge", b, a, a, "-o", "out", "--weights", w]
        o[f"verify/weights-{w or 'empty'}"] = lambda a, b, k, w=w: ["verify", b, "--base", b, a, a, "--weights", w]
    o["combine/one-adapter"] = lambda a, b, k: ["combine", a, "-o", "out"]
    o["combine/number-as-adapter"] = lambda a, b, k: ["combine", a, "0.5", "-o", "out", "--weights", "0.5"]
    o["combine/peft-with-kohya"] = lambda a, b, k: ["combine", a, k, "-o", "out"]
    o["combine/same-twice"] = lambda a, b, k: ["combine", a, a, "-o", "out"]
    for meth in ("svd", "ties", "dare_linear", "dare_ties", "magnitude_prune", "linear"):
        for extra in (
            (),
            ("--rank", "0"),
            ("--rank", "-2"),
            ("--density", "0"),
            ("--density", "2"),
            ("--density", "nan"),
            ("--seed", "-1"),
            ("--seed", "99999999999999999999"),
        ):
            o[f"combine/{meth}{''.join(extra)}"] = lambda a, b, k, meth=meth, extra=extra: [
                "combine",
                a,
                a,
                "-o",
                "out",
                "--method",
                meth,
                *extra,
            ]
    o["convert/no-to"] = lambda a, b, k: ["convert", a, "-o", "out"]
    o["convert/drop-without-for"] = lambda a, b, k: ["convert", a, "--to", "kohya", "--drop", "-o", "o.safetensors"]
    o["convert/base-missing"] = lambda a, b, k: ["convert", k, "--to", "peft", "--base", "nope", "-o", "out"]
    o["convert/base-is-adapter"] = lambda a, b, k: ["convert", k, "--to", "peft", "--base", a, "-o", "out"]
    o["convert/dora-to-lora-non-dora"] = lambda a, b, k: [
        "convert",
        a,
        "--to",
        "peft",
        "--dora-to-lora",
        b,
        "-o",
        "out",
    ]
    o["convert/dora-to-lora-missing"] = lambda a, b, k: [
        "convert",
        a,
        "--to",
        "peft",
        "--dora-to-lora",
        "nope",
        "-o",
        "out",
    ]
    o["convert/family-bogus"] = lambda a, b, k: [
        "convert",
        k,
        "--to",
        "diffusers",
        "--family",
        "bogus",
        "-o",
        "o.safetensors",
    ]
    o["convert/family-wrong"] = lambda a, b, k: [
        "convert",
        a,
        "--to",
        "kohya",
        "--family",
        "flux.1",
        "-o",
        "o.safetensors",
    ]
    o["convert/fuse-rank-no-family"] = lambda a, b, k: [
        "convert",
        a,
        "--to",
        "kohya",
        "--fuse-rank",
        "2",
        "-o",
        "o.safetensors",
    ]
    for rt in ("vllm", "sglang", "llama.cpp", "mlx", "diffusers", "comfyui"):
        o[f"convert/for-{rt}"] = lambda a, b, k, rt=rt: ["convert", a, "--for", rt, "-o", "out"]
        o[f"convert/kohya-for-{rt}"] = lambda a, b, k, rt=rt: ["convert", k, "--for", rt, "-o", "out"]
        o[f"validate/for-{rt}"] = lambda a, b, k, rt=rt: ["validate", k, "--for", rt]
    o["convert/to-gguf-base-config-wrong-type"] = lambda a, b, k: [
        "convert",
        a,
        "--to",
        "gguf",
        "--base",
        b,
        "-o",
        "o.gguf",
    ]
    for mr in ("nan", "-1", "2", "inf"):
        o[f"merge/min-retained-{mr}"] = lambda a, b, k, mr=mr: ["merge", b, a, "-o", "out", "--min-retained", mr]
    o["merge/unmerge"] = lambda a, b, k: ["merge", b, a, "-o", "out", "--unmerge"]
    o["merge/qlora-tiny"] = lambda a, b, k: ["merge", b, a, "-o", "out", "--qlora-base", "nf4"]
    o["merge/stochastic-seed-huge"] = lambda a, b, k: [
        "merge",
        b,
        a,
        "-o",
        "out",
        "--rounding",
        "stochastic",
        "--seed",
        "99999999999999999999",
    ]
    o["merge/report-is-out"] = lambda a, b, k: ["merge", b, a, "-o", "out", "--report", "out"]
    o["merge/report-in-out"] = lambda a, b, k: ["merge", b, a, "-o", "out", "--report", "out/r.json"]
    o["merge/report-is-input"] = lambda a, b, k: [
        "merge",
        b,
        a,
        "-o",
        "out",
        "--report",
        f"{a}/adapter_config.json",
        "--force",
    ]
    o["merge/kohya-into-llama"] = lambda a, b, k: ["merge", b, k, "-o", "out"]
    o["merge/allow-unmatched-kohya"] = lambda a, b, k: ["merge", b, k, "-o", "out", "--allow-unmatched"]
    o["merge/dtype-fp16-overflow"] = lambda a, b, k: [
        "merge",
        b,
        a,
        "-o",
        "out",
        "--dtype",
        "fp16",
        "--weights",
        "1e30",
    ]
    o["merge/out-is-base"] = lambda a, b, k: ["merge", b, a, "-o", b, "--force"]
    o["merge/out-inside-base"] = lambda a, b, k: ["merge", b, a, "-o", f"{b}/merged"]
    o["merge/out-dot"] = lambda a, b, k: ["merge", b, a, "-o", "."]
    o["merge/out-dotdot"] = lambda a, b, k: ["merge", b, a, "-o", "..", "--force"]
    o["merge/out-empty"] = lambda a, b, k: ["merge", b, a, "-o", ""]
    o["merge/out-hf"] = lambda a, b, k: ["merge", b, a, "-o", "hf://x/y"]
    o["resize/out-is-input"] = lambda a, b, k: ["resize", a, "-o", a, "-r", "2", "--force"]
    o["resize/out-is-input-file"] = lambda a, b, k: [
        "resize",
        a,
        "-o",
        f"{a}/adapter_model.safetensors",
        "-r",
        "2",
        "--force",
    ]
    o["resize/out-dev-null"] = lambda a, b, k: ["resize", a, "-o", "/dev/null", "-r", "2", "--force"]
    o["resize/out-parent-missing"] = lambda a, b, k: ["resize", a, "-o", "no/such/dir/out", "-r", "2"]
    o["resize/out-under-a-file"] = lambda a, b, k: ["resize", a, "-o", f"{k}/out", "-r", "2"]
    o["rescale/out-is-kohya-input"] = lambda a, b, k: ["rescale", k, "-o", k, "--factor", "2", "--force"]
    o["convert/out-is-base"] = lambda a, b, k: [
        "convert",
        a,
        "--to",
        "kohya",
        "--base",
        b,
        "-o",
        f"{b}/model.safetensors",
        "--force",
    ]
    o["extract/same-model"] = lambda a, b, k: ["extract", b, b, "-o", "out", "-r", "2"]
    o["extract/rank-0"] = lambda a, b, k: ["extract", b, b, "-o", "out", "-r", "0"]
    o["extract/threshold-2"] = lambda a, b, k: ["extract", b, b, "-o", "out", "--threshold", "2"]
    o["extract/threshold-nan"] = lambda a, b, k: ["extract", b, b, "-o", "out", "--threshold", "nan"]
    o["extract/format-diffusers"] = lambda a, b, k: ["extract", b, b, "-o", "out", "-r", "2", "--format", "diffusers"]
    o["extract/adapter-as-model"] = lambda a, b, k: ["extract", a, k, "-o", "out", "-r", "2"]
    o["verify/adapter-as-merged"] = lambda a, b, k: ["verify", a, "--base", b, a]
    o["verify/no-adapters"] = lambda a, b, k: ["verify", b, "--base", b]
    o["diff/same"] = lambda a, b, k: ["diff", a, a]
    o["diff/peft-vs-kohya"] = lambda a, b, k: ["diff", a, k]
    o["diff/base-vs-adapter"] = lambda a, b, k: ["diff", b, a]
    o["validate/base-is-adapter"] = lambda a, b, k: ["validate", a, "--base", a]
    o["validate/strict"] = lambda a, b, k: ["validate", k, "--strict", "--json"]
    o["inspect/token-option"] = lambda a, b, k: ["inspect", a, "--token", FAKE_TOKEN]
    o["inspect/unknown-option"] = lambda a, b, k: ["inspect", a, f"--x={FAKE_TOKEN}"]
    o["rescale/allow-pickle-on-safetensors"] = lambda a, b, k: [
        "rescale",
        a,
        "-o",
        "out",
        "--factor",
        "2",
        "--allow-pickle",
    ]


_add_options()


# ---------------------------------------------------------------------------------------------
# the corpus


def build_corpus() -> list[Case]:
    cases: list[Case] = []
    for i, (group, name, builder) in enumerate(adapter_inputs()):
        builder = templated(builder)
        chosen = {READERS[i % len(READERS)], WRITERS[i % len(WRITERS)]}
        for cmd in ADAPTER_COMMANDS:
            cases.append(_adapter_case(group, name, builder, cmd, cmd in chosen))
    for i, kind in enumerate(BASE_KINDS):
        names = list(BASE_COMMANDS)
        chosen = {names[(i + j) % len(names)] for j in (0, 2, 4, 6)}
        make_base = templated(
            lambda root, kind=kind: (llama_base(root / "in", name="base"), _base_variant(kind)(root / "in", "base"))
        )
        for cmd in BASE_COMMANDS:
            cases.append(_base_case(kind, cmd, cmd in chosen, make_base))
    for key, argv in OPTIONS.items():
        cases.append(Case(f"options/{key}", "options", key.split("/")[0], _opt(argv)))
    return cases


# ---------------------------------------------------------------------------------------------
# snapshots


def snapshot(root: Path, skip: set[Path]) -> dict[str, str]:
    """relative path -> what it is (sha256 of a regular file's bytes, a link's target, a kind);
    never opens anything but regular files, never follows links, skips the paths in `skip`."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in list(dirnames):
            p = here / name
            if p in skip:
                dirnames.remove(name)
                continue
            if p.is_symlink():
                found[str(p.relative_to(root))] = "link:" + os.readlink(p)
                dirnames.remove(name)
            else:
                found[str(p.relative_to(root))] = "dir"
        for name in filenames:
            p = here / name
            if p in skip:
                continue
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                found[rel] = "link:" + os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                found[rel] = "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                found[rel] = f"mode:{stat.S_IFMT(st.st_mode):o}"
    return found


def written_files(root: Path, outs: list[str]) -> Iterator[Path]:
    """Regular files under the outputs (file or folder) of a case, links not followed."""
    for o in outs:
        p = root / o
        if p.is_symlink() or not p.exists():
            continue
        if p.is_file():
            yield p
            continue
        for dirpath, _, filenames in os.walk(p):
            for name in filenames:
                f = Path(dirpath) / name
                if f.is_file() and not f.is_symlink():
                    yield f


# ---------------------------------------------------------------------------------------------
# running and judging


@dataclass
class Outcome:
    case: Case
    argv: list[str]
    code: int
    seconds: float
    over_bound: bool
    traceback: bool
    changed: list[str]  # paths outside the outputs that changed, appeared or vanished
    leaks: list[str]  # where the fake token was found
    stdout: str
    stderr: str

    @property
    def problems(self) -> list[str]:
        found = []
        if self.over_bound:
            found.append(f"ran past its bound ({self.seconds:.0f} s)")
        elif self.code == 3:
            found.append("exit 3")
        elif self.code not in (0, 1, 2):
            found.append(f"exit {self.code}")
        if self.traceback:
            found.append("traceback")
        if self.changed:
            found.append("changed outside -o: " + ", ".join(self.changed[:5]))
        if self.leaks:
            found.append("token in " + ", ".join(self.leaks[:5]))
        return found


TRACEBACK = "Traceback (most recent call last)"


def run_corpus(
    cases: list[Case], workdir: Path, *, workers: int = 2, bounds: dict[str, float] | None = None
) -> list[Outcome]:
    """Build every case under workdir/<n>, run them all, and judge each run."""
    import shutil

    from runner import Job, run_jobs

    prepared = []
    _TEMPLATE_ROOT[:] = [workdir.parent / (workdir.name + "-templates")]
    try:
        for i, case in enumerate(cases):
            root = workdir / f"c{i:04d}"
            root.mkdir(parents=True)
            argv = case.build(root)
            outs = outputs_of(argv)
            # an output that exists before the run is an input (or a place that is no output): watched
            skip = {root / o for o in outs if not os.path.lexists(root / o)}
            skip |= {p.parent for p in skip if p.parent != root and not os.path.lexists(p.parent)}
            prepared.append((root, argv, outs, skip, snapshot(root, skip)))
    finally:
        shutil.rmtree(_TEMPLATE_ROOT[0], ignore_errors=True)
        _TEMPLATES.clear()
        _TEMPLATE_ROOT.clear()
    bound_of = bounds or {}
    jobs = [
        Job(argv, str(root), bound_of.get(case.id, BOUND), case.python)
        for case, (root, argv, *_) in zip(cases, prepared)
    ]
    results = run_jobs(jobs, workdir=workdir, workers=workers)
    outcomes = []
    for case, (root, argv, outs, skip, before), res in zip(cases, prepared, results):
        after = snapshot(root, skip)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        leaks = [name for name, text in (("stdout", res.stdout), ("stderr", res.stderr)) if FAKE_TOKEN in text]
        for f in written_files(root, [o for o in outs if root / o in skip]):
            if FAKE_TOKEN.encode() in f.read_bytes():
                leaks.append(str(f.relative_to(root)))
        outcomes.append(
            Outcome(
                case,
                argv,
                res.code,
                res.seconds,
                res.over_bound,
                TRACEBACK in res.stdout + res.stderr,
                changed,
                leaks,
                res.stdout,
                res.stderr,
            )
        )
    return outcomes
