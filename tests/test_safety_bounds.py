"""Hostile inputs, round two (issue 22 items 7-10): values, bounds and precision.

Each case builds a small world under tmp_path, snapshots it (test_safety.snapshot: the sha256 of
every file, link targets, special files), runs one loratool command in a subprocess with a wall-clock
bound, and checks the exit code, exactly one `Error:` line for a refusal (no traceback), and that
nothing changed outside `-o` (for a refusal, nothing at all).

- 7: NaN/Inf in any tensor a command would write (lora_B.bias, DoRA magnitudes, LyCORIS .diff,
  .diff_b, .dora_scale) is refused, naming the output file and the key;
- 8: side files that are FIFOs, devices or absurdly large are refused; user and config regexes
  finish in bounded time; zip bombs (.pt, .npz) and absurd GGUF counts are refused before they
  are unpacked or walked;
- 9: a float64 base is merged in float64; integer/bool modules_to_save are not cast into weights;
- 10: inputs that used to end in an internal error (exit 3) are one clear error (exit 2).
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from factories import build_adapter
from safetensors.torch import load_file, save_file
from test_safety import error_lines, snapshot

# Every command finishes well within this; the catastrophic cases took minutes (or hung) before.
BOUND_S = 60

MODULES = {"model.layers.0.self_attn.q_proj": (16, 16), "model.layers.0.self_attn.v_proj": (8, 16)}
LONG_NAME = "model.layers.0." + "a" * 48 + "b"  # `(a|aa)+$` backtracks ~1.6^48 times on it (minutes with re)

_WRAP = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print(f"\\nMAXRSS_KB={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}")
sys.exit(code)
"""


@dataclass
class Result:
    code: int
    out: str
    err: str
    maxrss_mb: float


def run_bounded(args: list[Any], cwd: Path, timeout: float = BOUND_S) -> Result:
    """`loratool ARGS` in a fresh process (through a wrapper that reports its peak memory), killed
    after `timeout` seconds: a hang or a runaway fails the test instead of stalling the suite."""
    env = {k: v for k, v in os.environ.items() if k != "LORATOOL_DEBUG"}
    cmd = [sys.executable, "-c", _WRAP, sys.executable, "-m", "loratool", *map(str, args)]
    # a session of its own: on timeout the whole group goes, loratool included (not only the wrapper)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env,
                          start_new_session=True) as p:
        try:
            stdout, stderr = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            pytest.fail(f"loratool {' '.join(map(str, args))} ran past its {timeout} s bound")
    out, _, rss = stdout.rpartition("\nMAXRSS_KB=")
    return Result(p.returncode, out, stderr, int(rss) / 1024)


@dataclass
class Case:
    args: list[Any]
    code: int
    message: str  # regex: the Error: line (exit 2), stdout (exit 1)
    out: Path | None = None  # the only place that may change (exit 0)
    max_rss_mb: float | None = None  # peak memory of the command
    after: Callable[[], None] | None = None


CASES: dict[str, Callable[[Path], Case]] = {}


def case(fn: Callable[[Path], Case]) -> Callable[[Path], Case]:
    CASES[fn.__name__.removeprefix("case_").replace("_", "-")] = fn
    return fn


# ---------------------------------------------------------------------------------------------
# builders (safetensors / numpy / zlib directly, independent of loratool's writers)


def peft(w: Path, name: str = "adapter", modules: dict[str, tuple[int, int]] | None = None, **kw: Any) -> Path:
    return build_adapter(w, fmt="peft", modules=modules or MODULES, name=name, **kw)


def peft_with(w: Path, name: str, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """A PEFT adapter whose tensor file gets `tensors` (suffix -> tensor, per module) added."""
    d = peft(w, name, config=config)
    sd = load_file(d / "adapter_model.safetensors")
    for m in MODULES:
        for suffix, t in tensors.items():
            sd[f"base_model.model.{m}.{suffix}"] = t[: MODULES[m][0]].clone()
    save_file(sd, d / "adapter_model.safetensors", {"format": "pt"})
    return d


def with_nan(t: torch.Tensor, value: float = float("nan")) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[1] = value
    return t


KOHYA = {"lora_unet_a.lora_down.weight": torch.randn(2, 16, generator=torch.Generator().manual_seed(0)),
         "lora_unet_a.lora_up.weight": torch.randn(16, 2, generator=torch.Generator().manual_seed(1)),
         "lora_unet_a.alpha": torch.tensor(2.0)}


def kohya_with(path: Path, extra: dict[str, torch.Tensor]) -> Path:
    save_file({**KOHYA, **extra}, str(path))
    return path


def deflated_zeros(prefix: bytes, zeros: int) -> tuple[bytes, int]:
    """(raw deflate stream, crc32) of `prefix` followed by `zeros` zero bytes, built from one
    compressed 16 MiB block repeated (each block self-contained after a full flush)."""
    chunk = 16 << 20
    assert zeros % chunk == 0
    head = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = head.compress(prefix) + head.flush(zlib.Z_FULL_FLUSH)
    body = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = body.compress(bytes(chunk)) + body.flush(zlib.Z_FULL_FLUSH)
    final = zlib.compressobj(9, zlib.DEFLATED, -15).flush()  # an empty last block
    crc = zlib.crc32(prefix)
    zero_chunk = bytes(chunk)
    for _ in range(zeros // chunk):
        crc = zlib.crc32(zero_chunk, crc)
    return first + block * (zeros // chunk) + final, crc


def zip_bomb(path: Path, members: dict[str, tuple[bytes, int]]) -> Path:
    """A zip archive of deflated members: name -> (prefix, count of zero bytes after it)."""
    local, central = b"", b""
    for name, (prefix, zeros) in members.items():
        data, crc = deflated_zeros(prefix, zeros)
        size = len(prefix) + zeros
        raw = name.encode()
        offset = len(local)
        local += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, crc, len(data), size, len(raw), 0)
        local += raw + data
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0x21, crc, len(data), size,
                               len(raw), 0, 0, 0, 0, 0, offset) + raw
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), len(local), 0)
    path.write_bytes(local + central + end)
    return path


def npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    text = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode()
    pad = 64 - (10 + len(text) + 1) % 64
    text += b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text


def gguf_adapter(path: Path, *, note: bytes = b"ok", tensors: dict[str, np.ndarray] | None = None,
                 array: tuple[int, list[Any]] = (4, [1, 2, 3])) -> Path:
    """A GGUF v3 LoRA adapter written byte by byte (key-values, tensor infos, aligned data)."""
    def string(s: bytes) -> bytes:
        return struct.pack("<Q", len(s)) + s

    rng = np.random.default_rng(0)
    tensors = tensors if tensors is not None else {
        "blk.0.attn_q.weight.lora_a": rng.standard_normal((4, 16)).astype(np.float32),
        "blk.0.attn_q.weight.lora_b": rng.standard_normal((16, 4)).astype(np.float32)}
    etype, values = array
    kv = [string(b"general.architecture") + struct.pack("<I", 8) + string(b"llama"),
          string(b"general.type") + struct.pack("<I", 8) + string(b"adapter"),
          string(b"adapter.type") + struct.pack("<I", 8) + string(b"lora"),
          string(b"adapter.lora.alpha") + struct.pack("<If", 6, 8.0),
          string(b"zz.note") + struct.pack("<I", 8) + string(note)]
    if etype == 8:
        items = b"".join(string(v) for v in values)
    else:
        items = struct.pack(f"<{len(values)}I", *values)
    kv.append(string(b"zz.array") + struct.pack("<IIQ", 9, etype, len(values)) + items)
    ggml = {np.dtype(np.float32): 0, np.dtype(np.float16): 1, np.dtype(np.int32): 26, np.dtype(np.float64): 28}
    infos, data = b"", b""
    for name, a in tensors.items():
        infos += string(name.encode()) + struct.pack("<I", a.ndim) + struct.pack(f"<{a.ndim}Q", *reversed(a.shape))
        infos += struct.pack("<IQ", ggml[a.dtype], len(data))
        data += a.tobytes() + bytes(-len(a.tobytes()) % 32)
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv)) + b"".join(kv) + infos
    path.write_bytes(head + bytes(-len(head) % 32) + data)
    return path


def patch_count(path: Path, key: bytes, count: int) -> Path:
    """Overwrite the element count of array `key` (after its type and element type)."""
    raw = bytearray(path.read_bytes())
    at = raw.index(key) + len(key) + 8
    struct.pack_into("<Q", raw, at, count)
    path.write_bytes(bytes(raw))
    return path


def base_file(w: Path, name: str = "base.safetensors", dtype: torch.dtype = torch.float32,
              extra: dict[str, torch.Tensor] | None = None) -> Path:
    g = torch.Generator().manual_seed(3)
    tensors = {f"{m}.weight": torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for m, s in MODULES.items()}
    save_file({**tensors, **(extra or {})}, str(w / name))
    return w / name


def model_dir(w: Path, name: str, config: str) -> Path:
    d = w / name
    d.mkdir()
    base_file(d, "model.safetensors")
    (d / "config.json").write_text(config)
    return d


# ---------------------------------------------------------------------------------------------
# 7. one finite check for every tensor written

NAN_BIAS = {"lora_B.bias": with_nan(torch.randn(16))}
NAN_MAGNITUDE = {"lora_magnitude_vector": with_nan(torch.rand(16) + 1)}


@case
def case_bias_nan_rescale(w: Path) -> Case:
    d = peft_with(w, "ad", NAN_BIAS, {"lora_bias": True})
    return Case(["rescale", d, "--factor", "2", "-o", w / "out"], 2,
                r"out/adapter_model\.safetensors: tensor '.*q_proj\.lora_B\.bias' would be written with 1 NaN and 0 "
                "Inf values; nothing was written")


@case
def case_bias_nan_resize(w: Path) -> Case:
    d = peft_with(w, "ad", NAN_BIAS, {"lora_bias": True})
    return Case(["resize", d, "-r", "2", "-o", w / "out"], 2,
                r"out/adapter_model\.safetensors: tensor '.*lora_B\.bias' .*1 NaN")


@case
def case_bias_nan_convert(w: Path) -> Case:
    d = peft_with(w, "ad", NAN_BIAS, {"lora_bias": True})
    return Case(["convert", d, "--to", "kohya", "-o", w / "out.safetensors"], 2,
                r"out\.safetensors: tensor '.*q_proj\.diff_b' would be written with 1 NaN")


@case
def case_dora_magnitude_inf_rescale(w: Path) -> Case:
    d = peft_with(w, "ad", {"lora_magnitude_vector": with_nan(torch.rand(16) + 1, float("inf"))}, {"use_dora": True})
    return Case(["rescale", d, "--factor", "2", "-o", w / "out"], 2,
                r"out/adapter_model\.safetensors: tensor '.*lora_magnitude_vector' would be written with 0 NaN and 1 "
                "Inf values")


@case
def case_dora_magnitude_nan_convert(w: Path) -> Case:
    d = peft_with(w, "ad", NAN_MAGNITUDE, {"use_dora": True})
    return Case(["convert", d, "--to", "kohya", "-o", w / "out.safetensors"], 2, r"tensor '.*dora_scale' .*1 NaN")


@case
def case_lycoris_diff_inf_resize(w: Path) -> Case:
    f = kohya_with(w / "ly.safetensors", {"lora_unet_b.diff": with_nan(torch.randn(16, 16), float("inf"))})
    return Case(["resize", f, "-r", "1", "-o", w / "out.safetensors"], 2,
                r"out\.safetensors: tensor 'lora_unet_b\.diff' would be written with 0 NaN and 1 Inf")


@case
def case_lycoris_diff_b_nan_convert(w: Path) -> Case:
    f = kohya_with(w / "ly.safetensors", {"lora_unet_b.diff_b": with_nan(torch.randn(16))})
    return Case(["convert", f, "--to", "kohya", "-o", w / "out.safetensors"], 2, r"tensor 'lora_unet_b\.diff_b'")


@case
def case_kohya_dora_scale_nan_rescale(w: Path) -> Case:
    f = kohya_with(w / "dora.safetensors", {"lora_unet_a.dora_scale": with_nan(torch.rand(16, 1) + 1)})
    return Case(["rescale", f, "--factor", "2", "-o", w / "out.safetensors"], 2,
                r"out\.safetensors: tensor 'lora_unet_a\.dora_scale' would be written with 1 NaN")


# ---------------------------------------------------------------------------------------------
# 8. bounded reads: side files, regexes, archives, GGUF counts


def _config_replaced(w: Path, make: Callable[[Path], None]) -> Path:
    d = peft(w, "ad")
    (d / "adapter_config.json").unlink()
    make(d / "adapter_config.json")
    return d


@case
def case_config_fifo_inspect(w: Path) -> Case:
    d = _config_replaced(w, os.mkfifo)
    return Case(["inspect", d], 2, r"adapter_config\.json: cannot be read \(is a FIFO")


@case
def case_config_fifo_validate(w: Path) -> Case:
    d = _config_replaced(w, os.mkfifo)
    return Case(["validate", d], 1, r"config-unreadable .*adapter_config\.json: cannot be read \(is a FIFO")


@case
def case_config_fifo_rescale(w: Path) -> Case:
    d = _config_replaced(w, os.mkfifo)
    return Case(["rescale", d, "--factor", "2", "-o", w / "out"], 2, r"adapter_config\.json: .*FIFO")


@case
def case_config_linked_to_dev_zero(w: Path) -> Case:
    d = _config_replaced(w, lambda p: p.symlink_to("/dev/zero"))
    # refused as a link out of the folder, or (a link inside it) as a device: never read
    return Case(["inspect", d], 2, r"adapter_config\.json: (cannot be read \(is a character device|is a symbolic link "
                "leading out of the input folder)", max_rss_mb=1000)


@case
def case_config_of_200_mb(w: Path) -> Case:
    def sparse(p: Path) -> None:
        with open(p, "wb") as f:
            f.truncate(200_000_000)  # a hole: no disk used, but 200 MB to read

    d = _config_replaced(w, sparse)
    return Case(["inspect", d], 2, r"adapter_config\.json: cannot be read \(200,000,000 bytes, more than the "
                "100,000,000", max_rss_mb=1000)


@case
def case_index_of_200_mb(w: Path) -> Case:
    d = w / "base"
    d.mkdir()
    with open(d / "model.safetensors.index.json", "wb") as f:
        f.truncate(200_000_000)
    return Case(["validate", peft(w), "--base", d], 2, r"model\.safetensors\.index\.json: .*200,000,000 bytes",
                max_rss_mb=1000)


@case
def case_base_config_fifo_merge(w: Path) -> Case:
    d = w / "base"
    d.mkdir()
    base_file(d, "model.safetensors")
    os.mkfifo(d / "config.json")
    return Case(["merge", d, peft(w), "-o", w / "out"], 2, r"config\.json: is a FIFO")


@case
def case_rank_pattern_backtracking(w: Path) -> Case:
    d = peft(w, modules={**MODULES, LONG_NAME: (8, 16)}, config={"rank_pattern": {"(a|aa)+$": 4}})
    return Case(["inspect", d], 0, "", after=None)


@case
def case_alpha_pattern_backtracking_resize(w: Path) -> Case:
    d = peft(w, modules={**MODULES, LONG_NAME: (8, 16)}, config={"alpha_pattern": {"q_proj|(a|aa)+$": 4}})
    return Case(["resize", d, "-r", "2", "-o", w / "out"], 0, "", out=w / "out")


@case
def case_modules_backtracking(w: Path) -> Case:
    d = peft(w, modules={**MODULES, LONG_NAME: (8, 16)})
    return Case(["resize", d, "-r", "2", "--modules", "(a|aa)+$", "-o", w / "out"], 2,
                r"--modules '\(a\|aa\)\+\$' matches none of the 3 modules")


@case
def case_module_weights_backtracking(w: Path) -> Case:
    d = peft(w, modules={**MODULES, LONG_NAME: (8, 16)})
    return Case(["rescale", d, "--module-weights", "(a|aa)+$=0.5,q_proj=2", "-o", w / "out"], 0, "", out=w / "out")


@case
def case_pt_zip_bomb(w: Path) -> Case:
    f = zip_bomb(w / "adapter.pt", {"archive/data.pkl": (b"\x80\x02", 1 << 30)})
    return Case(["inspect", f], 2, r"adapter\.pt: is a pickle file, not loaded", max_rss_mb=700)


@case
def case_pt_zip_bomb_allow_pickle(w: Path) -> Case:
    f = zip_bomb(w / "adapter.pt", {"archive/data.pkl": (b"\x80\x02", 1 << 30)})
    return Case(["inspect", f, "--allow-pickle"], 2, r"adapter\.pt: a [\d,]+-byte archive whose members unpack to "
                r"1,073,741,826 bytes .*zip bomb", max_rss_mb=700)


@case
def case_npz_bomb(w: Path) -> Case:
    f = zip_bomb(w / "adapters.npz", {"a.npy": (npy_header("<f4", (1 << 28,)), 1 << 30)})
    return Case(["inspect", f], 2, r"adapters\.npz: a [\d,]+-byte archive whose members unpack to", max_rss_mb=700)


@case
def case_gguf_string_array_of_2_pow_60(w: Path) -> Case:
    f = patch_count(gguf_adapter(w / "a.gguf", array=(8, [b"x", b"y"])), b"zz.array", 1 << 60)
    return Case(["inspect", f], 2, r"a\.gguf: not a readable GGUF file \('zz\.array' claims "
                r"1,152,921,504,606,846,976 array elements")


@case
def case_gguf_number_array_of_2_pow_60(w: Path) -> Case:
    f = patch_count(gguf_adapter(w / "a.gguf"), b"zz.array", 1 << 60)
    return Case(["validate", f], 2, r"'zz\.array' claims 1,152,921,504,606,846,976 array elements")


@case
def case_gguf_tensor_count_absurd(w: Path) -> Case:
    f = gguf_adapter(w / "a.gguf")
    raw = bytearray(f.read_bytes())
    struct.pack_into("<Q", raw, 8, 1 << 62)
    f.write_bytes(bytes(raw))
    return Case(["inspect", f], 2, r"a\.gguf: not a readable GGUF file \(.*4,611,686,018,427,387,904 tensors")


# ---------------------------------------------------------------------------------------------
# 9. precision


def _float64_merge_is_float64(w: Path, ad: Path, out: Path) -> Callable[[], None]:
    def check() -> None:
        base = load_file(w / "base.safetensors")
        merged = load_file(out)
        sd = load_file(ad / "adapter_model.safetensors")
        cfg = json.loads((ad / "adapter_config.json").read_text())
        scale = cfg["lora_alpha"] / cfg["r"]
        for m in MODULES:
            a = sd[f"base_model.model.{m}.lora_A.weight"].double()
            b = sd[f"base_model.model.{m}.lora_B.weight"].double()
            want = base[f"{m}.weight"] + scale * (b @ a)  # independent float64 reference
            got = merged[f"{m}.weight"]
            assert got.dtype == torch.float64
            # through float32 the error is ~1e-7 relative; float64 maths leaves ~1e-16
            assert float((got - want).abs().max()) <= 1e-12 * float(want.abs().max())

    return check


@case
def case_float64_base_merged_in_float64(w: Path) -> Case:
    base_file(w, dtype=torch.float64)
    ad = peft(w)
    out = w / "merged.safetensors"
    return Case(["merge", w / "base.safetensors", ad, "-o", out], 0, "", out=out,
                after=_float64_merge_is_float64(w, ad, out))


@case
def case_int64_modules_to_save(w: Path) -> Case:
    base_file(w, extra={"lm_head.weight": torch.zeros(10, 16)})
    ad = peft(w, config={"modules_to_save": ["lm_head"]},
              extra_tensors={"base_model.model.lm_head.weight": torch.arange(160).reshape(10, 16)})
    return Case(["merge", w / "base.safetensors", ad, "-o", w / "out.safetensors"], 2,
                r"adapter_model\.safetensors: 'base_model\.model\.lm_head\.weight': saved tensor holds int64 values "
                r"but lm_head\.weight in the base is float32")


@case
def case_bool_modules_to_save(w: Path) -> Case:
    base_file(w, extra={"lm_head.weight": torch.zeros(10, 16, dtype=torch.float16)})
    ad = peft(w, config={"modules_to_save": ["lm_head"]},
              extra_tensors={"base_model.model.lm_head.weight": torch.ones(10, 16, dtype=torch.bool)})
    return Case(["merge", w / "base.safetensors", ad, "-o", w / "out.safetensors"], 2,
                r"saved tensor holds bool values but lm_head\.weight in the base is float16")


# ---------------------------------------------------------------------------------------------
# 10. what used to be an internal error


@case
def case_rank_pattern_huge_repeat(w: Path) -> Case:
    d = peft(w, config={"rank_pattern": {"a{4294967296}": 4}})
    return Case(["inspect", d], 2, r"pattern key 'a\{4294967296\}' .*not a usable regular expression")


@case
def case_rank_pattern_3000_nested_groups(w: Path) -> Case:
    d = peft(w, config={"alpha_pattern": {"(" * 3000 + "q" + ")" * 3000: 4}})
    return Case(["validate", d], 1, r"config-invalid\s.*pattern\s+key\s.*nested\s+too\s+deeply")


@case
def case_modules_huge_repeat(w: Path) -> Case:
    return Case(["resize", peft(w), "-r", "2", "--modules", "a{4294967296}", "-o", w / "out"], 2,
                r"--modules 'a\{4294967296\}': not a valid regular expression")


@case
def case_modules_3000_nested_groups(w: Path) -> Case:
    return Case(["resize", peft(w), "-r", "2", "--modules", "(" * 3000 + "q" + ")" * 3000, "-o", w / "out"], 2,
                r"--modules .*not a valid regular expression \(nested too deeply\)")


@case
def case_module_weights_huge_repeat(w: Path) -> Case:
    return Case(["merge", base_file(w), peft(w), "--module-weights", "q{4294967296}=0.5", "-o", w / "out.safetensors"],
                2, r"--module-weights: 'q\{4294967296\}' is not a regular expression")


_DEEP = "[" * 100_000 + "]" * 100_000


@case
def case_base_config_nested_100k_convert_gguf(w: Path) -> Case:
    d = model_dir(w, "base", _DEEP)
    return Case(["convert", peft(w), "--to", "gguf", "--base", d, "-o", w / "out.gguf"], 2,
                r"config\.json: cannot read the base model's config \(nested too deeply\)")


@case
def case_base_config_nested_100k_merge(w: Path) -> Case:
    d = model_dir(w, "base", _DEEP)
    return Case(["merge", d, peft(w), "-o", w / "out"], 0, "", out=w / "out")


@pytest.mark.parametrize("config, message", [
    ([1, 2], r"the base model's config is a JSON list, expected an object"),
    ({"architectures": "LlamaForCausalLM"}, r"'architectures' is 'LlamaForCausalLM', expected a list"),
    ({"architectures": [5]}, r"architecture 5 has no GGUF tensor naming"),
    ({"architectures": ["LlamaForCausalLM"], "num_attention_heads": "x"}, r"'num_attention_heads' is 'x'"),
    ({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": [1]}, r"'num_hidden_layers' is \[1\]"),
    ({"architectures": ["LlamaForCausalLM"], "num_key_value_heads": True}, r"'num_key_value_heads' is True"),
])
def test_convert_to_gguf_with_a_config_of_the_wrong_type(config: Any, message: str, tmp_path: Path) -> None:
    w = tmp_path / "w"
    w.mkdir()
    d = model_dir(w, "base", json.dumps(config))
    check(tmp_path, Case(["convert", peft(w), "--to", "gguf", "--base", d, "-o", w / "out.gguf"], 2, message))


ZERO_RANK = {
    "loha": {"lora_unet_b.hada_w1_a": torch.zeros(16, 0), "lora_unet_b.hada_w1_b": torch.zeros(0, 16),
             "lora_unet_b.hada_w2_a": torch.zeros(16, 0), "lora_unet_b.hada_w2_b": torch.zeros(0, 16)},
    "lokr": {"lora_unet_b.lokr_w1": torch.ones(4, 4), "lora_unet_b.lokr_w2_a": torch.zeros(4, 0),
             "lora_unet_b.lokr_w2_b": torch.zeros(0, 4)},
    "tucker": {"lora_unet_b.lora_down.weight": torch.zeros(0, 4, 1, 1),
               "lora_unet_b.lora_mid.weight": torch.zeros(0, 0, 3, 3),
               "lora_unet_b.lora_up.weight": torch.zeros(8, 0, 1, 1)},
}


@pytest.mark.parametrize("algo", sorted(ZERO_RANK))
@pytest.mark.parametrize("command", ["resize", "spectrum", "diff", "convert"])
def test_zero_rank_lycoris_module(algo: str, command: str, tmp_path: Path) -> None:
    w = tmp_path / "w"
    w.mkdir()
    f = kohya_with(w / "zero.safetensors", {**ZERO_RANK[algo], "lora_unet_b.alpha": torch.tensor(1.0)})
    args = {"resize": ["resize", f, "-r", "1", "-o", w / "out.safetensors"], "spectrum": ["inspect", "--spectrum", f],
            "diff": ["diff", f, kohya_with(w / "other.safetensors", {})],
            "convert": ["convert", f, "--to", "lora", "-o", w / "out.safetensors"]}[command]
    check(tmp_path, Case(args, 2, rf"zero\.safetensors: module 'lora_unet_b' \({algo}\): empty factors: .* is \("))


@case
def case_bool_base_weight(w: Path) -> Case:
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.ones(16, 16, dtype=torch.bool),
               "model.layers.0.self_attn.v_proj.weight": torch.zeros(8, 16)}, str(w / "base.safetensors"))
    return Case(["merge", w / "base.safetensors", peft(w), "-o", w / "out.safetensors"], 2,
                r"base\.safetensors: base tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' is bool, not a "
                r"floating-point weight")


@case
def case_npz_string_array(w: Path) -> Case:
    np.savez(w / "adapters.npz", **{"a.lora_a": np.array(["x", "y"]), "a.lora_b": np.zeros((2, 2), np.float32)})
    return Case(["inspect", w / "adapters.npz"], 2, r"adapters\.npz: array 'a\.lora_a' holds <U1 values \(text\)")


@case
def case_npz_complex_array(w: Path) -> Case:
    np.savez(w / "adapters.npz", **{"a.lora_a": np.ones((2, 2), np.complex64)})
    return Case(["inspect", w / "adapters.npz"], 2, r"array 'a\.lora_a' holds complex64 values \(complex numbers\)")


def _lokr_nan(w: Path) -> Path:
    return kohya_with(w / "lokr.safetensors", {"lora_unet_b.lokr_w1": with_nan(torch.randn(4, 4)),
                                                "lora_unet_b.lokr_w2": torch.randn(4, 4),
                                                "lora_unet_b.alpha": torch.tensor(1.0)})


@case
def case_lokr_nan_convert(w: Path) -> Case:
    return Case(["convert", _lokr_nan(w), "--to", "lora", "-o", w / "out.safetensors"], 2,
                r"lokr\.safetensors: module 'lora_unet_b': w1 holds NaN or Inf values")


@case
def case_lokr_nan_verify(w: Path) -> Case:
    save_file({"a.weight": torch.zeros(16, 16), "b.weight": torch.zeros(16, 16)}, str(w / "base.safetensors"))
    return Case(["verify", w / "base.safetensors", "--base", w / "base.safetensors", _lokr_nan(w)], 2,
                r"the delta of .*lokr\.safetensors: 'lora_unet_b' is NaN/Inf or beyond float32")


@case
def case_lora_nan_verify(w: Path) -> Case:
    base_file(w)
    return Case(["verify", w / "base.safetensors", "--base", w / "base.safetensors", peft(w, nan=True)], 2,
                r"the delta of .*adapter: 'model\.layers\.0\.self_attn\.q_proj' is NaN/Inf or beyond float32")


@case
def case_gguf_non_utf8_string(w: Path) -> Case:
    f = gguf_adapter(w / "a.gguf", note=b"\xff\xfe\xfd")
    return Case(["inspect", f], 2, r"a\.gguf: not a readable GGUF file \(string value of 'zz\.note' is not UTF-8 text")


@case
def case_gguf_non_utf8_key(w: Path) -> Case:
    f = gguf_adapter(w / "a.gguf")
    f.write_bytes(f.read_bytes().replace(b"zz.note", b"zz.\xffote"))
    return Case(["inspect", f], 2, r"a\.gguf: not a readable GGUF file \(key is not UTF-8 text")


@case
def case_gguf_i32_tensor(w: Path) -> Case:
    rng = np.random.default_rng(1)
    f = gguf_adapter(w / "a.gguf", tensors={
        "blk.0.attn_q.weight.lora_a": np.arange(64, dtype=np.int32).reshape(4, 16),
        "blk.0.attn_q.weight.lora_b": rng.standard_normal((16, 4)).astype(np.float32)})
    return Case(["inspect", "--spectrum", f], 2, r"a\.gguf: tensor 'blk\.0\.attn_q\.weight\.lora_a' is I32, neither "
                "floating-point nor a quantized type")


@case
def case_gguf_f64_tensors(w: Path) -> Case:
    rng = np.random.default_rng(1)
    f = gguf_adapter(w / "a.gguf", tensors={"blk.0.attn_q.weight.lora_a": rng.standard_normal((4, 16)),
                                            "blk.0.attn_q.weight.lora_b": rng.standard_normal((16, 4))})
    return Case(["inspect", "--spectrum", f], 0, r"float64")


# ---------------------------------------------------------------------------------------------
# the harness


def check(tmp_path: Path, c: Case) -> None:
    before = snapshot(tmp_path)
    r = run_bounded(c.args, tmp_path)
    after = snapshot(tmp_path)
    assert r.code == c.code, (r.out, r.err)
    assert "Traceback" not in r.err, r.err
    errors = error_lines(r.err)
    if c.code == 2:
        assert len(errors) == 1 and re.search(c.message, errors[0]), r.err
        assert r.out.strip() == "", r.out
    elif c.code == 1:
        assert re.search(c.message, r.out, re.S), r.out
    else:
        assert not errors, r.err
        assert re.search(c.message, r.out), r.out
    print(f"peak memory {r.maxrss_mb:.0f} MB")
    if c.max_rss_mb is not None:
        assert r.maxrss_mb < c.max_rss_mb, f"peak memory {r.maxrss_mb:.0f} MB"
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    if c.code == 0 and c.out is not None:
        mine = os.path.relpath(c.out, tmp_path)
        changed = [k for k in changed if k != mine and not k.startswith(mine + os.sep)]
    assert changed == [], changed  # every input byte-identical, nothing outside -o touched
    if c.after:
        c.after()


@pytest.mark.parametrize("name", sorted(CASES))
def test_bounded_input(name: str, tmp_path: Path) -> None:
    w = tmp_path / "w"
    w.mkdir()
    check(tmp_path, CASES[name](w))


def test_backtracking_pattern_matches_as_re_does() -> None:
    """The matcher without backtracking agrees with re on what both can match (item 8)."""
    from loratool.patterns import compile_pattern

    patterns = [r"(a|aa)+$", r"(.*\.)?(q_proj)$", r"^(?!.*vision).*(q_proj|v_proj)", r"(?i)Q_PROJ", r"(?<=\.)v_proj$",
                r"\bmlp\b", r"a{2,3}b?", r"[^.]+\.[^.]+$", r"(x*)*y", r"(?:ab|a)(?:c|bc)", r"\Aq.*\Z", r"[\w]+_proj$",
                r"(?s).", r"\Bproj", r"layers\.\d+\.", r"(a|b)*c{0,2}$"]
    rng = np.random.default_rng(0)
    names = ["model.layers.0.self_attn.q_proj", "vision.q_proj", "aaaa", "aab", "abc", "x.v_proj", "xxxxy", "q\n",
             "", "layers.12.mlp", *("".join(rng.choice(list("abqxyv._1\n"), size=int(rng.integers(0, 14))))
                                    for _ in range(200))]
    for p in patterns:
        program = compile_pattern(p)._program
        assert not isinstance(program, str), p
        rx = re.compile(p)
        for n in names:
            for how in ("search", "match", "fullmatch"):
                assert program.run(n, how) == (getattr(rx, how)(n) is not None), (p, n, how)
