"""`loratool inspect`: the --json document, --spectrum against numpy, header-only reads, human output,
and the reader's promise to raise only loratool errors on garbage."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import loratool
from loratool.cli import cli
from loratool.errors import LoratoolError

Q = "model.layers.0.self_attn.q_proj"
V = "model.layers.0.self_attn.v_proj"
D = "model.layers.0.mlp.down_proj"
P = "base_model.model."
TOP_KEYS = {"schema", "format", "path", "base_model", "num_modules", "lora_params", "fan_in_fan_out", "rslora",
            "dora", "metadata", "extras", "unsupported", "modules"}
MODULE_KEYS = {"name", "kind", "out_features", "in_features", "rank", "alpha", "alpha_source", "scale", "dtype"}


def inspect_json(*args: str) -> dict:
    r = CliRunner().invoke(cli, ["inspect", *map(str, args), "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def inspect_text(*args: str) -> str:
    r = CliRunner().invoke(cli, ["inspect", *map(str, args)])
    assert r.exit_code == 0, r.output
    return r.stdout


def lora_numel(tensors: dict[str, torch.Tensor]) -> int:
    suffixes = (".lora_A.weight", ".lora_B.weight", ".lora_down.weight", ".lora_up.weight",
                ".lora_embedding_A", ".lora_embedding_B")
    return sum(t.numel() for k, t in tensors.items() if k.endswith(suffixes))


# ---------------------------------------------------------------------------------------------
# --json


def test_peft_json_document(make_adapter):
    path = make_adapter(
        fmt="peft", rank={Q: 8, V: 4, D: 4}, alpha={Q: 16, V: 8, D: 8},
        extra_tensors={f"{P}lm_head.weight": torch.zeros(50, 32)},
    )
    doc = inspect_json(path)
    assert set(doc) >= TOP_KEYS
    assert doc["schema"] == 1
    assert doc["format"] == "peft"
    assert doc["path"] == str(path)
    assert doc["base_model"] == "test/tiny-base"
    assert doc["num_modules"] == 3
    assert doc["lora_params"] == lora_numel(load_file(path / "adapter_model.safetensors"))
    assert doc["lora_params"] == (8 * 32 + 32 * 8) + (4 * 32 + 16 * 4) + (4 * 48 + 32 * 4)
    assert (doc["fan_in_fan_out"], doc["rslora"], doc["dora"]) == (False, False, False)
    assert doc["metadata"] == {"format": "pt"}
    assert doc["extras"] == [{"name": "lm_head.weight", "shape": [50, 32], "dtype": "float32"}]
    assert doc["unsupported"] == []
    rows = {m["name"]: m for m in doc["modules"]}
    assert sorted(rows) == sorted([Q, V, D])  # without the base_model.model. prefix
    for row in rows.values():
        assert set(row) >= MODULE_KEYS
    assert {k: rows[Q][k] for k in MODULE_KEYS} == {
        "name": Q, "kind": "linear", "out_features": 32, "in_features": 32, "rank": 8, "alpha": 16,
        "alpha_source": "pattern", "scale": 2.0, "dtype": "float32"}
    assert {k: rows[D][k] for k in MODULE_KEYS} == {
        "name": D, "kind": "linear", "out_features": 32, "in_features": 48, "rank": 4, "alpha": 8,
        "alpha_source": "config", "scale": 2.0, "dtype": "float32"}
    assert rows[V]["out_features"] == 16 and rows[V]["alpha_source"] == "config"


def test_rslora_scale_and_no_config_alpha(make_adapter):
    doc = inspect_json(make_adapter(fmt="peft", rank=4, alpha=8, rslora=True, dtype="bfloat16"))
    assert doc["rslora"] is True
    assert all(m["scale"] == pytest.approx(8 / math.sqrt(4)) for m in doc["modules"])
    assert {m["dtype"] for m in doc["modules"]} == {"bfloat16"}
    implied = inspect_json(make_adapter(fmt="peft", rank=4, config=False))
    assert {(m["alpha"], m["alpha_source"], m["scale"]) for m in implied["modules"]} == {(4, "implied", 1.0)}


def test_kohya_json_document(make_adapter):
    stored = "lora_unet_down_blocks_0_attentions_0_proj_in"
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    path = make_adapter(fmt="kohya", modules={stored: (32, 24), conv: (16, 8, 3, 3)}, rank=4,
                        alpha={stored: 2, conv: None}, dtype="float16",
                        metadata={"ss_network_dim": "4", "ss_sd_model_name": "sd15.ckpt", "modelspec.title": "x"},
                        extra_tensors={"lora_unet_mid_block_attentions_0_proj_out.oft_blocks": torch.ones(4, 2, 2)})
    doc = inspect_json(path)
    assert doc["format"] == "kohya" and doc["base_model"] == "sd15.ckpt"
    assert doc["metadata"] == {"ss_network_dim": "4", "ss_sd_model_name": "sd15.ckpt", "modelspec.title": "x"}
    assert doc["unsupported"] == ["lora_unet_mid_block_attentions_0_proj_out.oft_blocks"]
    assert doc["lora_params"] == lora_numel(load_file(path))
    rows = {m["name"]: m for m in doc["modules"]}
    assert {k: rows[stored][k] for k in MODULE_KEYS} == {
        "name": stored, "kind": "linear", "out_features": 32, "in_features": 24, "rank": 4, "alpha": 2,
        "alpha_source": "tensor", "scale": 0.5, "dtype": "float16"}
    assert {k: rows[conv][k] for k in MODULE_KEYS} == {
        "name": conv, "kind": "conv", "out_features": 16, "in_features": 8, "rank": 4, "alpha": 4,
        "alpha_source": "implied", "scale": 1.0, "dtype": "float16"}


def test_embedding_and_fan_in_fan_out_rows(make_adapter):
    emb = "model.embed_tokens"
    doc = inspect_json(make_adapter(fmt="peft", modules={"encoder.dense": (24, 16)}, embeddings={emb: (50, 16)},
                                    fan_in_fan_out=True))
    rows = {m["name"]: m for m in doc["modules"]}
    assert rows[emb]["kind"] == "embedding"
    assert (rows[emb]["in_features"], rows[emb]["out_features"]) == (50, 16)  # vocabulary in, dimension out
    assert rows["encoder.dense"]["fan_in_fan_out"] is True and doc["fan_in_fan_out"] is True
    assert (rows["encoder.dense"]["out_features"], rows["encoder.dense"]["in_features"]) == (24, 16)


# ---------------------------------------------------------------------------------------------
# --spectrum


def dense_delta(tensors: dict[str, torch.Tensor], down_key: str, up_key: str, scale: float) -> np.ndarray:
    down = tensors[down_key].double().numpy()
    up = tensors[up_key].double().numpy()
    return scale * up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)  # (out, r) @ (r, in·k)


def energy_share_rank(s: np.ndarray, share: float) -> int:
    """Smallest k with sum_{i<k} s_i^2 / sum s_i^2 >= share (Frobenius energy), by brute force."""
    total = float(np.sum(s**2))
    for k in range(1, len(s) + 1):
        if float(np.sum(s[:k] ** 2)) >= share * total * (1 - 1e-9):
            return k
    return len(s)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_spectrum_matches_numpy_svd(make_adapter, dtype):
    conv = "model.layers.0.conv"
    path = make_adapter(fmt="peft", modules={Q: (32, 32), D: (32, 48), conv: (16, 8, 3, 3)},
                        rank={Q: 8, D: 4, conv: 4}, alpha={Q: 16, D: 3, conv: 4}, rslora=True, dtype=dtype, seed=3)
    tensors = load_file(path / "adapter_model.safetensors")
    doc = inspect_json(path, "--spectrum")
    for m in doc["modules"]:
        name = m["name"]
        scale = {Q: 16, D: 3, conv: 4}[name] / math.sqrt(m["rank"])
        ref = np.linalg.svd(dense_delta(tensors, f"{P}{name}.lora_A.weight", f"{P}{name}.lora_B.weight", scale),
                            compute_uv=False)
        ours = np.array(m["singular_values"])
        assert len(ours) == m["rank"]
        np.testing.assert_allclose(ours, ref[: m["rank"]], rtol=1e-5, atol=1e-5 * ref[0])
        assert np.all(ref[m["rank"]:] <= 1e-9 * ref[0])  # the rest of the dense spectrum is zero
        assert m["rank_90"] == energy_share_rank(ref[: m["rank"]], 0.90)
        assert m["rank_99"] == energy_share_rank(ref[: m["rank"]], 0.99)


def test_spectrum_rank_rules_on_a_known_spectrum(tmp_path):
    """Factors built with chosen singular values: rank_90/rank_99 are checkable by hand."""
    sigmas = [10.0, 4.0, 1.0, 0.5, 0.1, 0.01]
    q, _ = torch.linalg.qr(torch.randn(20, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    w, _ = torch.linalg.qr(torch.randn(16, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    up = (q * torch.tensor(sigmas, dtype=torch.float64)).float().contiguous()  # (20, 6)
    down = w.T.float().contiguous()  # (6, 16), orthonormal rows
    path = tmp_path / "known.safetensors"
    save_file({"lora_unet_x.lora_down.weight": down, "lora_unet_x.lora_up.weight": up,
               "lora_unet_x.alpha": torch.tensor(6.0)}, str(path))
    (m,) = inspect_json(path, "--spectrum")["modules"]
    np.testing.assert_allclose(m["singular_values"], sigmas, rtol=1e-5)
    # energy 117.2601: 100 -> 0.853 < 0.9; 116 -> 0.989 >= 0.9 but < 0.99; 117 -> 0.9978 >= 0.99
    assert (m["rank_90"], m["rank_99"]) == (2, 3)


def test_spectrum_human_table(make_adapter):
    text = inspect_text(make_adapter(fmt="kohya", rank=4), "--spectrum")
    assert "r90" in text and "r99" in text
    assert "lora_unet_down_blocks_0_resnets_0_conv1" in text


# ---------------------------------------------------------------------------------------------
# header-only


_NO_TORCH = textwrap.dedent("""
    import sys
    from loratool.cli import main
    try:
        main(sys.argv[1:])
    except SystemExit as e:
        code = e.code
    sys.stderr.write(f"\\nEXIT={code} TORCH={'torch' in sys.modules}\\n")
""")


def run_without_torch(*args: str) -> tuple[int, bool, str]:
    p = subprocess.run([sys.executable, "-c", _NO_TORCH, *map(str, args)], capture_output=True, text=True,
                       timeout=60)
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("EXIT="), p.stderr
    code, torch_imported = last.split()
    return int(code.removeprefix("EXIT=")), torch_imported == "TORCH=True", p.stdout


def garbage_payload(path: Path, keys: list[str] | None = None) -> None:
    """Overwrite tensor bytes with 0xFF (NaN in every float dtype), all of them or those of `keys`."""
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    for key, entry in header.items():
        if key == "__metadata__" or (keys is not None and key not in keys):
            continue
        begin, end = entry["data_offsets"]
        raw[8 + n + begin:8 + n + end] = b"\xff" * (end - begin)
    path.write_bytes(bytes(raw))


def test_inspect_reads_no_tensor_bytes_and_no_torch(make_adapter):
    path = make_adapter(fmt="peft", rank=4, dtype="bfloat16")
    weights = path / "adapter_model.safetensors"
    garbage_payload(weights)
    assert torch.isnan(load_file(weights)[f"{P}{Q}.lora_A.weight"].float()).all()  # really garbage
    code, torch_imported, out = run_without_torch("inspect", path, "--json")
    assert code == 0 and not torch_imported
    doc = json.loads(out)
    assert doc["num_modules"] == 3 and {m["rank"] for m in doc["modules"]} == {4}
    code, torch_imported, out = run_without_torch("inspect", path, "--modules")
    assert code == 0 and not torch_imported and Q in out


def test_kohya_inspect_reads_only_alphas(make_adapter):
    """kohya alphas are 0-d tensors: inspect reads those few bytes, never the factors."""
    path = make_adapter(fmt="kohya", alpha=3)
    garbage_payload(path, [k for k in load_file(path) if not k.endswith(".alpha")])
    code, torch_imported, out = run_without_torch("inspect", path, "--json")
    assert code == 0 and not torch_imported
    assert {m["alpha"] for m in json.loads(out)["modules"]} == {3}


# ---------------------------------------------------------------------------------------------
# human output


def test_human_summary_shows_format_rank_and_alpha_source(make_adapter):
    text = inspect_text(make_adapter(fmt="peft", rank={Q: 8, V: 4, D: 4}, alpha={Q: 16, V: 8, D: 8}))
    assert "peft" in text
    assert "min 4, max 8, most common 4" in text
    assert "config: 2" in text and "pattern: 1" in text  # where each alpha came from
    assert "test/tiny-base" in text
    kohya = inspect_text(make_adapter(fmt="kohya", rank=16, alpha=None))
    assert "kohya" in kohya and "implied: 4" in kohya
    assert any(line.split()[:2] == ["rank", "16"] for line in kohya.splitlines())


def test_modules_flag_prints_one_row_per_module(make_adapter):
    names = [f"model.layers.{i}.self_attn.{p}" for i in range(3) for p in ("q_proj", "k_proj")]
    path = make_adapter(fmt="peft", modules={n: (32, 32) for n in names}, rank=4)
    text = inspect_text(path, "--modules")
    lines = text.splitlines()
    for n in names:
        rows = [ln for ln in lines if ln.split()[:1] == [n]]
        assert len(rows) == 1, (n, text)
        assert rows[0].split()[1:5] == ["linear", "32", "32", "4"]
    assert sum(ln.split()[:1] == [n] for ln in lines for n in names) == len(names)
    assert not any(ln.split()[:1] == [names[0]] for ln in inspect_text(path).splitlines())  # not without --modules


# ---------------------------------------------------------------------------------------------
# the reader on garbage raises only loratool errors


def read_or_loratool_error(path: Path, **kwargs) -> None:
    try:
        adapter = loratool.read(path, **kwargs)
    except LoratoolError:
        return
    # when it does read, the report must be well-formed (strict JSON: no NaN/Infinity)
    from loratool.ops.inspect import InspectReport

    json.dumps(InspectReport(adapter, path, 0).to_dict(), allow_nan=False)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def valid_kohya(work: Path) -> Path:
    from factories import build_adapter

    return build_adapter(work, fmt="kohya", name="kohya.safetensors", metadata={"ss_network_dim": "4"})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=512))
def test_random_bytes_raise_only_loratool_errors(work, data):
    path = work / "random.safetensors"
    path.write_bytes(data)
    read_or_loratool_error(path)


@settings(max_examples=30, deadline=None)
@given(data=st.binary(max_size=256))
def test_random_pickle_raises_only_loratool_errors(work, data):
    path = work / "random.bin"
    path.write_bytes(data)
    read_or_loratool_error(path, allow_pickle=True)


@settings(max_examples=250, deadline=None)
@given(start=st.integers(0, 10_000), length=st.integers(0, 64), junk=st.binary(max_size=64),
       fix_length=st.booleans())
def test_spliced_header_raises_only_loratool_errors(work, valid_kohya, start, length, junk, fix_length):
    whole = valid_kohya.read_bytes()
    (n,) = struct.unpack("<Q", whole[:8])
    header = whole[8:8 + n]
    i = start % (len(header) + 1)
    mutated = header[:i] + junk + header[i + length:]
    prefix = struct.pack("<Q", len(mutated)) if fix_length else whole[:8]
    path = work / "spliced.safetensors"
    path.write_bytes(prefix + mutated + whole[8 + n:])
    read_or_loratool_error(path)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=250, deadline=None)
@given(field=st.sampled_from(["dtype", "shape", "data_offsets", "__metadata__", "entry", "alpha_dtype"]),
       value=_json)
def test_structured_header_fuzz_raises_only_loratool_errors(work, valid_kohya, field, value):
    """A valid kohya header with one field replaced by arbitrary JSON."""
    whole = valid_kohya.read_bytes()
    (n,) = struct.unpack("<Q", whole[:8])
    header = json.loads(whole[8:8 + n])
    keys = [k for k in header if k != "__metadata__"]
    down = next(k for k in keys if k.endswith(".lora_down.weight"))
    alpha = next(k for k in keys if k.endswith(".alpha"))
    if field == "__metadata__":
        header["__metadata__"] = value
    elif field == "entry":
        header[down] = value
    elif field == "alpha_dtype":
        header[alpha]["dtype"] = value if not isinstance(value, bool) else "BOOL"
    else:
        header[down][field] = value
    raw = json.dumps(header).encode()
    path = work / "structured.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + whole[8 + n:])
    read_or_loratool_error(path)


@pytest.mark.parametrize("code", ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I16", "I8",
                                  "U64", "U32", "U16", "U8", "BOOL"])
def test_alpha_of_any_dtype_is_read_or_refused_cleanly(tmp_path, valid_kohya, code):
    whole = valid_kohya.read_bytes()
    (n,) = struct.unpack("<Q", whole[:8])
    header = json.loads(whole[8:8 + n])
    alpha = next(k for k in header if k.endswith(".alpha"))
    size = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4}.get(code, 2 if "16" in code else 1)
    header[alpha] = {"dtype": code, "shape": [], "data_offsets": [0, size]}  # the first bytes of the data
    raw = json.dumps(header).encode()
    path = tmp_path / "alpha.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + whole[8 + n:])
    read_or_loratool_error(path)
