"""A corpus of malformed inputs, each run through `loratool inspect` and `loratool validate`.

The contract (DESIGN.md section 7): a user-caused failure exits 2 with exactly one `Error: ...`
line on stderr that names the file (an optional `Hint: ...` line may follow) and no traceback;
validate exits 1 with findings on stdout when it could read the adapter and found errors, and 2
only when it could not read it at all.

`validate` imports torch (it reads tensor bytes), which costs seconds per process on a small CI
machine, so the runs share one driver process that imports torch once and forks a child process
per run; each child calls the entry point `python -m loratool` calls (loratool.cli.main) with its
stdout/stderr going to files, and an exception escaping it is printed as the interpreter would.
A few cases also run as plain `python -m loratool` subprocesses and must give identical results.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from factories import build_adapter
from safetensors.torch import save_file

# ---------------------------------------------------------------------------------------------
# builders


def st_bytes(header: dict[str, Any] | bytes, data: bytes = b"") -> bytes:
    """A safetensors file from a header (dict -> JSON) and a raw data section."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


F32_4x4 = {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}


def kohya(root: Path, **kwargs: Any) -> Path:
    return build_adapter(root, fmt="kohya", **kwargs)


def peft(root: Path, **kwargs: Any) -> Path:
    return build_adapter(root, fmt="peft", **kwargs)


def truncated(root: Path) -> Path:
    whole = kohya(root).read_bytes()
    return write(root / "truncated.safetensors", whole[:-100])


def random_bytes(root: Path) -> Path:
    return write(root / "random.safetensors", random.Random(0).randbytes(4096))


def dir_without_adapter(root: Path) -> Path:
    d = root / "not_an_adapter"
    d.mkdir()
    (d / "README.md").write_text("hello\n")
    return d


def peft_with_config_dir(root: Path) -> Path:
    """adapter_config.json that exists but cannot be read as a file (works as root, unlike chmod)."""
    d = peft(root, name="config_dir")
    (d / "adapter_config.json").unlink()
    (d / "adapter_config.json").mkdir()
    return d


def _lora_on_modules_to_save(root: Path, **kw: bool) -> Path:
    sys.path.insert(0, str(Path(__file__).parent / "formats"))
    from test_wild import lora_on_modules_to_save

    return lora_on_modules_to_save(root, **kw)


def _zip_bytes() -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("readme.txt", "not an adapter")
    return buf.getvalue()


def peft_with_config_text(text: str) -> Callable[[Path], Path]:
    def build(root: Path) -> Path:
        d = peft(root, name="bad_config")
        (d / "adapter_config.json").write_text(text)
        return d

    return build


Q = "model.layers.0.self_attn.q_proj"
KQ = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def rank_mismatch(root: Path) -> Path:
    # down says rank 4, up says rank 8
    return kohya(root, modules={KQ: (32, 32)}, drop=[f"{KQ}.lora_up.weight"],
                 extra_tensors={f"{KQ}.lora_up.weight": torch.zeros(32, 8)}, name="rank_mismatch.safetensors")


def pickle_adapter(root: Path) -> Path:
    d = peft(root, name="pickled")
    tensors = {}
    from safetensors.torch import load_file

    tensors = load_file(d / "adapter_model.safetensors")
    (d / "adapter_model.safetensors").unlink()
    torch.save(tensors, d / "adapter_model.bin")
    return d


MARKER = "PWNED_BY_PICKLE"


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


def malicious_pickle(root: Path) -> Path:
    d = peft(root, name="malicious")
    (d / "adapter_model.safetensors").unlink()
    with open(d / "adapter_model.bin", "wb") as f:
        pickle.dump({"base_model.model.x.lora_A.weight": _Evil(root / MARKER)}, f)
    return d


def no_lora_tensors(root: Path) -> Path:
    path = root / "base_model.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(8, 4), "lm_head.weight": torch.zeros(8, 4)}, str(path))
    return path


def oft_only(root: Path) -> Path:
    path = root / "oft.safetensors"
    stem = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{stem}.oft_blocks": torch.ones(4, 8, 8), f"{stem}.alpha": torch.tensor(4.0)}, str(path))
    return path


def loha_only(root: Path) -> Path:
    path = root / "loha.safetensors"
    stem = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{stem}.hada_w1_a": torch.ones(32, 4), f"{stem}.hada_w1_b": torch.ones(4, 32),
               f"{stem}.hada_w2_a": torch.ones(32, 4), f"{stem}.hada_w2_b": torch.ones(4, 32),
               f"{stem}.alpha": torch.tensor(4.0)}, str(path))
    return path


def xlabs(root: Path, *, drop_up: bool = False, extra: bool = False) -> Path:
    """An XLabs (x-flux) FLUX.1 file: one double-block proj layer, maybe without its up, maybe
    with a key of another layout beside it."""
    path = root / "xlabs.safetensors"
    p = "double_blocks.0.processor.proj_lora1"
    sd = {f"{p}.down.weight": torch.ones(2, 8), f"{p}.up.weight": torch.ones(8, 2)}
    if drop_up:
        del sd[f"{p}.up.weight"]
    if extra:
        sd["model.other.weight"] = torch.ones(2)
    save_file(sd, str(path))
    return path


def one_d_down(root: Path) -> Path:
    return kohya(root, modules={KQ: (32, 32)}, drop=[f"{KQ}.lora_down.weight"],
                 extra_tensors={f"{KQ}.lora_down.weight": torch.ones(4)}, name="one_d.safetensors")


def rank_zero(root: Path) -> Path:
    return kohya(root, modules={KQ: (32, 32)}, drop=[f"{KQ}.lora_down.weight", f"{KQ}.lora_up.weight"],
                 extra_tensors={f"{KQ}.lora_down.weight": torch.ones(0, 32),
                                f"{KQ}.lora_up.weight": torch.ones(32, 0)}, name="rank0.safetensors")


def empty_peft(root: Path) -> Path:
    d = peft(root, name="empty_peft")
    write(d / "adapter_model.safetensors", st_bytes({}))
    return d


ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"


def legacy_processor(root: Path, *, as_bin: bool = False) -> Path:
    """The 2023 diffusers attention-processor layout (`unet.save_attn_procs`), no alpha anywhere."""
    g = torch.Generator().manual_seed(0)
    sd = {}
    for proj in ("to_q", "to_k", "to_v", "to_out"):
        sd[f"{ATTN}.processor.{proj}_lora.down.weight"] = torch.randn(4, 32, generator=g)
        sd[f"{ATTN}.processor.{proj}_lora.up.weight"] = torch.randn(32, 4, generator=g)
    if as_bin:
        torch.save(sd, root / "pytorch_lora_weights.bin")
        return root / "pytorch_lora_weights.bin"
    save_file(sd, root / "pytorch_lora_weights.safetensors")
    return root / "pytorch_lora_weights.safetensors"


def single_file(metadata: dict[str, str], name: str = "single.safetensors") -> Callable[[Path], Path]:
    """PEFT-style keys without a prefix and no config beside them (diffusers save_lora_adapter)."""
    def build(root: Path) -> Path:
        g = torch.Generator().manual_seed(0)
        sd = {f"{ATTN}.to_q.lora_A.weight": torch.randn(4, 32, generator=g),
              f"{ATTN}.to_q.lora_B.weight": torch.randn(32, 4, generator=g)}
        save_file(sd, root / name, metadata={"format": "pt", **metadata})
        return root / name
    return build


def dora_per_input_column(root: Path) -> Path:
    """kohya keys with a `.dora_scale` of shape (1, in) (LyCORIS wd_on_out=False, OneTrainer) on a
    square layer, where a per-row reading would silently fit the element count."""
    g = torch.Generator().manual_seed(0)
    sd = {f"{KQ}.lora_down.weight": torch.randn(4, 32, generator=g),
          f"{KQ}.lora_up.weight": torch.randn(32, 4, generator=g), f"{KQ}.alpha": torch.tensor(4.0),
          f"{KQ}.dora_scale": torch.rand(1, 32, generator=g)}
    save_file(sd, root / "dora_in.safetensors")
    return root / "dora_in.safetensors"


def npz_adapter(root: Path) -> Path:
    import numpy as np

    np.savez(root / "adapters.npz", **{"model.layers.0.self_attn.q_proj.lora_a": np.zeros((32, 4), np.float32)})
    return root / "adapters.npz"


def torch_zip_named_safetensors(root: Path) -> Path:
    torch.save({"a.lora_down.weight": torch.zeros(2, 2)}, root / "renamed.safetensors")
    return root / "renamed.safetensors"


def legacy_ckpt(root: Path) -> Path:
    torch.save({"state_dict": {"a.weight": torch.zeros(2)}}, root / "model.ckpt", _use_new_zipfile_serialization=False)
    return root / "model.ckpt"


# ---------------------------------------------------------------------------------------------
# the corpus


@dataclass
class Case:
    id: str
    build: Callable[[Path], Path]
    inspect_rc: int | None  # None: inspect not run for this case
    validate_rc: int
    codes: set[str] = field(default_factory=set)  # every finding code validate --json reports
    mention: str | None = None  # text the Error: line must contain (default: the input's file name)
    inspect_args: tuple[str, ...] = ()
    validate_args: tuple[str, ...] = ()


UNREADABLE = 2

CASES = [
    Case("truncated", truncated, 2, 2),
    Case("header-length-beyond-file",
         lambda r: write(r / "hlen.safetensors", struct.pack("<Q", 10_000) + b'{"a": 1}'), 2, 2),
    Case("header-not-json", lambda r: write(r / "notjson.safetensors", st_bytes(b"{this is not json"))
         , 2, 2),
    Case("header-not-utf8", lambda r: write(r / "latin1.safetensors", st_bytes(b'{"\xff\xfe": 1}')), 2, 2),
    Case("header-json-list", lambda r: write(r / "list.safetensors", st_bytes(b"[1, 2, 3]")), 2, 2),
    Case("header-deeply-nested",
         lambda r: write(r / "deep.safetensors", st_bytes(b"[" * 100_000 + b"]" * 100_000)), 2, 2),
    Case("header-5000-digit-integer",
         lambda r: write(r / "bigint.safetensors",
                         st_bytes(b'{"a.lora_down.weight": {"dtype": "F32", "shape": [' + b"9" * 5000
                                  + b'], "data_offsets": [0, 4]}}', b"\0" * 4)), 2, 2),
    Case("header-entry-not-object",
         lambda r: write(r / "entry.safetensors", st_bytes({"a.lora_down.weight": [1, 2]})), 2, 2,
         mention="a.lora_down.weight"),
    Case("offsets-out-of-range",
         lambda r: write(r / "offsets.safetensors",
                         st_bytes({"a.lora_down.weight": {**F32_4x4, "data_offsets": [1000, 1064]}}, b"\0" * 64)),
         2, 2, mention="a.lora_down.weight"),
    Case("offsets-not-dtype-times-shape",
         lambda r: write(r / "size.safetensors",
                         st_bytes({"a.lora_down.weight": {**F32_4x4, "data_offsets": [0, 60]}}, b"\0" * 64)),
         2, 2, mention="a.lora_down.weight"),
    Case("unknown-dtype",
         lambda r: write(r / "dtype.safetensors",
                         st_bytes({"a.lora_down.weight": {**F32_4x4, "dtype": "F128"}}, b"\0" * 64)),
         2, 2, mention="F128"),
    Case("metadata-non-string",
         lambda r: write(r / "meta.safetensors",
                         st_bytes({"__metadata__": {"ss_network_dim": 4}, "a.lora_down.weight": F32_4x4},
                                  b"\0" * 64)), 2, 2),
    Case("empty-file", lambda r: write(r / "empty.safetensors", b""), 2, 2),
    Case("five-bytes", lambda r: write(r / "five.safetensors", b"\x01\x02\x03\x04\x05"), 2, 2),
    Case("random-bytes", random_bytes, 2, 2),
    Case("valid-file-no-tensors", lambda r: write(r / "nothing.safetensors", st_bytes({})), 2, 2),
    Case("directory-without-adapter", dir_without_adapter, 2, 2),
    Case("missing-path", lambda r: r / "does_not_exist.safetensors", 2, 2),
    Case("no-lora-tensors", no_lora_tensors, 2, 2),
    Case("pickle-refused", pickle_adapter, 2, 2, mention="adapter_model.bin"),
    Case("pickle-allowed", pickle_adapter, 0, 0, inspect_args=("--allow-pickle",),
         validate_args=("--allow-pickle",)),
    Case("malicious-pickle-allowed", malicious_pickle, 2, 2, mention="adapter_model.bin",
         inspect_args=("--allow-pickle",), validate_args=("--allow-pickle",)),
    Case("validate-base-missing", lambda r: kohya(r, name="ok.safetensors"), None, 2,
         mention="no_base_here", validate_args=("--base", "no_base_here")),
    # readable adapters with problems: inspect stops (2), validate reports findings (1)
    Case("config-not-json", peft_with_config_text("{r: 4,"), 2, 1, {"config-invalid"},
         mention="adapter_config.json"),
    Case("config-json-list", peft_with_config_text("[4, 8]"), 2, 1, {"config-invalid"},
         mention="adapter_config.json"),
    Case("config-r-not-an-int",
         lambda r: peft(r, name="bad_r", config={"r": "eight"}), 2, 1, {"config-invalid"},
         mention="'r'"),
    Case("config-rank-pattern-not-an-int",
         lambda r: peft(r, name="bad_pattern", config={"rank_pattern": {"q_proj": "x"}}), 2, 1,
         {"config-invalid"}, mention="rank_pattern"),
    Case("down-without-up", lambda r: kohya(r, drop=[f"{KQ}.lora_up.weight"], name="no_up.safetensors"),
         2, 1, {"missing-up"}, mention=KQ),
    Case("up-without-down", lambda r: peft(r, drop=[f"base_model.model.{Q}.lora_A.weight"], name="no_down"),
         2, 1, {"missing-down"}, mention=Q),
    Case("rank-differs-down-up", rank_mismatch, 2, 1, {"rank-mismatch"}, mention=KQ),
    Case("rank-zero", rank_zero, 2, 1, {"bad-shape"}, mention=KQ),
    Case("one-d-down", one_d_down, 2, 1, {"bad-shape"}, mention=KQ),
    Case("rank-not-config-r", lambda r: peft(r, rank=4, config={"r": 8}, name="wrong_r"), 2, 1,
         {"config-rank-mismatch"}, mention="adapter_model.safetensors"),
    Case("rank-not-rank-pattern",
         lambda r: peft(r, rank=4, config={"rank_pattern": {"q_proj": 16}}, name="wrong_pattern"), 2, 1,
         {"config-rank-mismatch"}, mention=Q),
    Case("empty-peft-weights", empty_peft, 2, 1, {"no-lora-tensors"}, mention="empty_peft"),
    Case("alpha-nan", lambda r: kohya(r, alpha=float("nan"), name="alpha_nan.safetensors"), 2, 1,
         {"non-finite"}),
    # header-only inspect cannot see values; validate reads them
    Case("nan-in-factor", lambda r: kohya(r, nan=True, name="nan.safetensors"), 0, 1, {"non-finite"}),
    Case("inf-in-factor", lambda r: peft(r, inf=True, name="inf"), 0, 1, {"non-finite"}),
    Case("nan-in-factor-spectrum", lambda r: kohya(r, nan=True, name="nan_spec.safetensors"), 2, 1,
         {"non-finite"}, inspect_args=("--spectrum",)),
    # an OFT file is reported (inspect) and refused for operations (validate: no LoRA modules)
    Case("oft-only", oft_only, 0, 1, {"no-lora-tensors", "unsupported-tensor"}),
    # a LoHa file is read: inspect shows it, validate finds nothing wrong
    Case("xlabs", xlabs, 0, 0),
    Case("xlabs-missing-up", lambda r: xlabs(r, drop_up=True), 2, 1, {"missing-up"}),
    Case("xlabs-mixed-with-other-keys", lambda r: xlabs(r, extra=True), 2, 2, mention="XLabs"),
    Case("loha-only", loha_only, 0, 0),
    # files from the wild (issue #11)
    Case("legacy-attn-processor", legacy_processor, 0, 0, {"alpha-missing"}),
    Case("legacy-attn-processor-bin", lambda r: legacy_processor(r, as_bin=True), 0, 0, {"alpha-missing"},
         inspect_args=("--allow-pickle",), validate_args=("--allow-pickle",)),
    Case("single-file-header-alpha",
         single_file({"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 16, "peft_type": "LORA"})}),
         0, 0),
    Case("single-file-no-config", single_file({}), 0, 0, {"config-missing"}),
    Case("header-alpha-conflict", single_file({"lora_alpha": "8", "alpha": "16"}), 2, 1,
         {"config-invalid", "config-missing"}, mention="lora_alpha"),
    Case("header-metadata-not-json", single_file({"lora_adapter_metadata": "{r: 4"}), 2, 1,
         {"config-invalid", "config-missing"}, mention="lora_adapter_metadata"),
    Case("header-alpha-a-string",
         single_file({"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": "16"})}), 2, 1,
         {"config-invalid"}, mention="lora_alpha"),
    Case("config-use-dora-a-string", lambda r: peft(r, name="dora_str", config={"use_dora": "false"}), 2, 1,
         {"config-invalid"}, mention="use_dora"),
    Case("config-unreadable", peft_with_config_dir, 2, 1, {"config-unreadable"}, mention="adapter_config.json"),
    Case("dora-per-input-column", dora_per_input_column, 0, 0, {"dora-per-input-column"}),
    Case("npz-half-an-mlx-adapter", npz_adapter, 2, 2),  # read as MLX (export): no lora_b, exit 2
    Case("npy-container", lambda r: write(r / "a.npy", b"\x93NUMPY\x01\x00v\x00" + b" " * 118), 2, 2, mention="NumPy"),
    # GGUF is read (formats/gguf.py): an empty one and a corrupt one are clean errors
    Case("gguf-without-tensors", lambda r: write(r / "adapter.gguf", b"GGUF\x03\x00\x00\x00" + b"\0" * 64), 2, 2),
    Case("gguf-corrupt", lambda r: write(r / "bad.gguf", b"GGUF" + b"\0" * 64), 2, 2),
    Case("lora-on-modules-to-save", _lora_on_modules_to_save, 0, 0, {"inactive-copy"}),
    Case("lora-on-modules-to-save-no-weights",
         lambda r: _lora_on_modules_to_save(r, trained_weights=False), 0, 0,
         {"unsupported-layout", "unsupported-tensor"}),
    Case("lora-on-modules-to-save-copies-differ",
         lambda r: _lora_on_modules_to_save(r, twins_differ=True), 0, 1, {"inactive-copy", "inconsistent-copies"}),
    Case("hdf5-container", lambda r: write(r / "model.h5", b"\x89HDF\r\n\x1a\n" + b"\0" * 64), 2, 2, mention="HDF5"),
    Case("zip-container", lambda r: write(r / "x.zip", _zip_bytes()), 2, 2, mention="zip archive"),
    Case("torch-zip-named-safetensors", torch_zip_named_safetensors, 2, 2, mention="pickle"),
    Case("legacy-ckpt-pickle", legacy_ckpt, 2, 2, mention="pickle"),
]


# ---------------------------------------------------------------------------------------------
# running


@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LORATOOL_DEBUG", None)
    env["COLUMNS"] = "200"
    return env


def run_subprocess(args: list[str], cwd: Path) -> Run:
    p = subprocess.run([sys.executable, "-m", "loratool", *args], capture_output=True, text=True, cwd=cwd,
                       env=_env(), timeout=120)
    return Run(p.returncode, p.stdout, p.stderr)


_DRIVER = r"""
import gc, json, os, sys, traceback
# imported once here (the CLI imports them lazily); every forked child then runs the entry point
import torch, rich.table, loratool.cli._render, loratool.ops.inspect, loratool.ops.validate
import loratool.maths.guards, loratool.maths.svd
from loratool.cli import main

gc.freeze()  # children's garbage collections then leave the shared pages alone
codes = []
for argv, out, err in json.load(sys.stdin):
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
        os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        code = 1
        try:
            main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()  # as the interpreter prints an exception that escapes
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
print(json.dumps(codes))
"""


def run_batch(jobs: list[list[str]], cwd: Path) -> list[Run]:
    """Run `loratool <argv>` for each argv in forked children of one torch-importing process."""
    files = [(str(cwd / f".run{i}.out"), str(cwd / f".run{i}.err")) for i in range(len(jobs))]
    p = subprocess.run([sys.executable, "-c", _DRIVER], input=json.dumps([[a, o, e] for a, (o, e) in
                                                                        zip(jobs, files)]),
                       capture_output=True, text=True, cwd=cwd, env=_env(), timeout=300)
    assert p.returncode == 0, p.stderr
    codes = json.loads(p.stdout)
    return [Run(c, Path(o).read_text(), Path(e).read_text()) for c, (o, e) in zip(codes, files)]


@dataclass
class Results:
    path: Path
    inspect: Run | None
    validate: Run
    validate_json: Run


# cases also run as a plain `python -m loratool inspect` subprocess, to show the driver is faithful
REAL_SUBPROCESS = ("truncated", "header-deeply-nested", "missing-path", "down-without-up", "oft-only")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Results]:
    root = tmp_path_factory.mktemp("corpus")
    paths: dict[str, Path] = {}
    for case in CASES:
        d = root / case.id
        d.mkdir()
        paths[case.id] = case.build(d)
    # relative paths, as a user types them; cwd is the corpus root
    rel = {k: str(p.relative_to(root)) for k, p in paths.items()}
    jobs: list[list[str]] = []
    for case in CASES:
        jobs.append(["validate", rel[case.id], *case.validate_args])
        jobs.append(["validate", rel[case.id], "--json", *case.validate_args])
        jobs.append(["inspect", rel[case.id], *case.inspect_args])
    batch = run_batch(jobs, root)
    results = {}
    for i, case in enumerate(CASES):
        insp = batch[3 * i + 2] if case.inspect_rc is not None else None
        results[case.id] = Results(paths[case.id], insp, batch[3 * i], batch[3 * i + 1])
    for case_id in REAL_SUBPROCESS:
        real = run_subprocess(["inspect", rel[case_id]], root)
        assert real == results[case_id].inspect, (case_id, real)
    return results


def check_no_traceback(run: Run) -> None:
    assert "Traceback" not in run.stdout + run.stderr
    assert "internal error" not in run.stderr


def check_one_error_line(run: Run, mention: str) -> None:
    lines = run.stderr.splitlines()
    errors = [ln for ln in lines if ln.startswith("Error:")]
    assert len(errors) == 1, run.stderr
    assert mention in errors[0], (mention, errors[0])
    # nothing else but an optional hint
    others = [ln for ln in lines if not ln.startswith(("Error:", "Hint:"))]
    assert others == [], run.stderr
    assert sum(ln.startswith("Hint:") for ln in lines) <= 1


def _mention(case: Case, res: Results) -> str:
    return case.mention or res.path.name


# ---------------------------------------------------------------------------------------------
# tests


def test_corpus_is_big_enough():
    assert len(CASES) >= 18
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [c for c in CASES if c.inspect_rc is not None], ids=lambda c: c.id)
def test_inspect(case: Case, corpus: dict[str, Results]) -> None:
    res = corpus[case.id]
    run = res.inspect
    assert run is not None
    check_no_traceback(run)
    assert run.rc == case.inspect_rc, run.stderr
    if case.inspect_rc == 2:
        check_one_error_line(run, _mention(case, res))
        assert run.stdout == ""
    else:
        assert not any(ln.startswith("Error:") for ln in run.stderr.splitlines())
        assert res.path.name in run.stdout


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_validate(case: Case, corpus: dict[str, Results]) -> None:
    res = corpus[case.id]
    for run in (res.validate, res.validate_json):
        check_no_traceback(run)
        assert run.rc == case.validate_rc, run.stdout + run.stderr
        if case.validate_rc == UNREADABLE:
            check_one_error_line(run, _mention(case, res))
            assert run.stdout == ""  # no half-written report, no partial JSON
        else:
            assert not any(ln.startswith("Error:") for ln in run.stderr.splitlines())
    if case.validate_rc == UNREADABLE:
        return
    doc = json.loads(res.validate_json.stdout)
    assert doc["schema"] == 1
    assert doc["ok"] is (case.validate_rc == 0)
    assert {f["code"] for f in doc["findings"]} == case.codes
    for f in doc["findings"]:
        assert set(f) >= {"severity", "code", "module", "message"}
        assert f["severity"] in ("error", "warning")
    if case.validate_rc == 1:
        assert any(f["severity"] == "error" for f in doc["findings"])
        errors = [f for f in doc["findings"] if f["severity"] == "error"]
        assert any(_mention(case, res) in f["message"] or f["module"] == case.mention for f in errors)
        human = res.validate.stdout
        assert "FAILED" in human
        for code in case.codes:
            assert code in human


def test_pickle_refusals_give_the_reason(corpus: dict[str, Results]) -> None:
    """Issue #11 item 20: the refusal states the reason (arbitrary code execution) and the call the
    file would make, and never reads like advice to load it with weights_only=False."""
    for case_id in ("malicious-pickle-allowed", "pickle-refused"):
        run = corpus[case_id].inspect
        assert run is not None
        assert "arbitrary code" in run.stderr
        assert "weights_only=False" not in run.stderr
    allowed = corpus["malicious-pickle-allowed"].inspect
    assert allowed is not None and "system" in allowed.stderr  # os.system (posix.system) is named


def test_dora_axis_is_shown_and_refused(corpus: dict[str, Results], tmp_path: Path) -> None:
    """Per-input-column DoRA: shown by inspect; a format with one magnitude per output row (PEFT)
    refuses it by name (kohya-style files keep it: tests/ops/test_dora_lycoris.py)."""
    res = corpus["dora-per-input-column"]
    assert res.inspect is not None and "input column" in res.inspect.stdout
    run = run_subprocess(["convert", str(res.path), "--to", "peft", "-o", str(tmp_path / "x")], tmp_path)
    assert run.rc == 2
    check_one_error_line(run, "per input column")


def test_pickle_refusal_hints_at_allow_pickle(corpus: dict[str, Results]) -> None:
    run = corpus["pickle-refused"].inspect
    assert run is not None
    assert "--allow-pickle" in run.stderr


def test_malicious_pickle_never_runs(corpus: dict[str, Results]) -> None:
    root = corpus["malicious-pickle-allowed"].path.parent
    assert not (root / MARKER).exists()


def test_unsupported_is_reported_by_name(corpus: dict[str, Results]) -> None:
    run = corpus["oft-only"].inspect
    assert run is not None
    assert "oft_blocks" in run.stdout
    doc = json.loads(corpus["oft-only"].validate_json.stdout)
    messages = " ".join(f["message"] for f in doc["findings"])
    assert "OFT" in messages and "oft_blocks" in messages


def test_loha_is_read(corpus: dict[str, Results]) -> None:
    run = corpus["loha-only"].inspect
    assert run is not None
    assert "1 LyCORIS modules" in run.stdout and "loha: 1" in run.stdout
    doc = json.loads(corpus["loha-only"].validate_json.stdout)
    assert doc["ok"] and doc["num_modules"] == 1


def test_pickle_allowed_reads_the_same_modules(corpus: dict[str, Results]) -> None:
    run = corpus["pickle-allowed"].inspect
    assert run is not None
    assert "3 modules" in run.stdout


def test_debug_env_shows_traceback(tmp_path: Path) -> None:
    """LORATOOL_DEBUG=1 is the only way to get a traceback for a user error."""
    path = write(tmp_path / "empty.safetensors", b"")
    env = _env()
    env["LORATOOL_DEBUG"] = "1"
    p = subprocess.run([sys.executable, "-m", "loratool", "inspect", str(path)], capture_output=True, text=True,
                       env=env, timeout=60)
    assert p.returncode == 2
    assert "Traceback" in p.stderr
    assert p.stderr.rstrip().splitlines()[-1].startswith(("Error:", "Hint:"))


# ---------------------------------------------------------------------------------------------
# the other exits: internal bugs (3) and interruption (130), in-process through the entry point


def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from loratool.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    assert isinstance(exc.value.code, int)
    return exc.value.code, out.out, out.err


@pytest.mark.parametrize("debug", [False, True])
def test_internal_bug_exits_3(tmp_path, monkeypatch, capsys, debug):
    import loratool.ops.inspect

    def broken(*args: Any, **kwargs: Any) -> None:
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(loratool.ops.inspect, "inspect_adapter", broken)
    if debug:
        monkeypatch.setenv("LORATOOL_DEBUG", "1")
    else:
        monkeypatch.delenv("LORATOOL_DEBUG", raising=False)
    code, out, err = _main(["inspect", str(tmp_path)], capsys)
    assert code == 3 and out == ""
    errors = [ln for ln in err.splitlines() if ln.startswith("Error:")]
    assert errors == ["Error: internal error: ZeroDivisionError: division by zero"]
    assert ("Traceback" in err) is debug
    assert "LORATOOL_DEBUG=1" in err  # the hint says how to get the traceback


def test_interrupt_exits_130(tmp_path, monkeypatch, capsys):
    import loratool.ops.inspect

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(loratool.ops.inspect, "inspect_adapter", interrupted)
    code, _, err = _main(["inspect", str(tmp_path)], capsys)
    assert code == 130 and "Traceback" not in err


def test_multiline_messages_stay_one_error_line(tmp_path, monkeypatch, capsys):
    import loratool.ops.inspect
    from loratool.errors import FormatError

    def fails(*args: Any, **kwargs: Any) -> None:
        raise FormatError("x.safetensors: first\nsecond", hint="try\nthis")

    monkeypatch.setattr(loratool.ops.inspect, "inspect_adapter", fails)
    code, _, err = _main(["inspect", str(tmp_path)], capsys)
    assert code == 2
    assert err.splitlines() == ["Error: x.safetensors: first second", "Hint: try this"]
