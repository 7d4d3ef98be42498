"""read -> write -> read round trips for the PEFT and kohya writers (issue 2 item 4).

The inputs are built with safetensors.torch.save_file and json, and the expected values (tensors,
scales, hashes) come from those inputs, torch and hashlib, never from loratool itself.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import loratool
from loratool.adapter import Adapter, LoraModule
from loratool.errors import IncompatibleError, OutputExistsError
from loratool.io.tensors import TensorRef
from loratool.maths.delta import delta

PROVENANCE_KEYS = {"loratool.version", "loratool.op", "loratool.params", "loratool.sources"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def header_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def leftovers(parent: Path) -> list[str]:
    """Temporary siblings the atomic writer may have left behind."""
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def assert_same_module(a: LoraModule, b: LoraModule) -> None:
    assert torch.equal(a.down.load(), b.down.load()), a.name
    assert torch.equal(a.up.load(), b.up.load()), a.name
    assert a.down.dtype == b.down.dtype and a.up.dtype == b.up.dtype, a.name
    assert (a.magnitude is None) == (b.magnitude is None), a.name
    if a.magnitude is not None and b.magnitude is not None:
        assert torch.equal(a.magnitude.load().reshape(-1), b.magnitude.load().reshape(-1)), a.name
    assert (a.kind, a.fan_in_fan_out, a.rank) == (b.kind, b.fan_in_fan_out, b.rank), a.name
    assert a.scale == b.scale, a.name


# ---------------------------------------------------------------------------------------------
# PEFT


def make_peft_dir(root: Path, dtype: torch.dtype, *, rslora: bool, dora: bool = False) -> tuple[Path, dict[str, float]]:
    """A peft-layout adapter with a rank_pattern (regex and suffix keys), an alpha_pattern, an
    embedding, a conv, a modules_to_save head and (optionally) DoRA. Returns it and the expected
    scale per module, computed here from the config."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g).to(dtype)

    p = "base_model.model."
    # name -> (rank, in, out)
    linear = {
        "model.layers.0.self_attn.q_proj": (4, 32, 32),
        "model.layers.0.self_attn.v_proj": (6, 32, 16),  # "v_proj" suffix pattern: r 6, alpha 5
        "model.layers.1.self_attn.q_proj": (2, 32, 32),  # full-path pattern: r 2, alpha 3
        "model.layers.1.self_attn.v_proj": (6, 32, 16),
        "model.layers.1.mlp.down_proj": (4, 48, 32),
    }
    tensors: dict[str, torch.Tensor] = {}
    for name, (r, fin, fout) in linear.items():
        tensors[f"{p}{name}.lora_A.weight"] = rnd(r, fin)
        tensors[f"{p}{name}.lora_B.weight"] = rnd(fout, r)
        if dora:
            tensors[f"{p}{name}.lora_magnitude_vector"] = rnd(fout).abs()
    if not dora:
        tensors[f"{p}model.embed_tokens.lora_embedding_A"] = rnd(4, 64)  # (r, vocab)
        tensors[f"{p}model.embed_tokens.lora_embedding_B"] = rnd(32, 4)  # (dim, r)
        tensors[f"{p}model.conv.lora_A.weight"] = rnd(4, 8, 3, 3)
        tensors[f"{p}model.conv.lora_B.weight"] = rnd(16, 4, 1, 1)
        tensors[f"{p}score.weight"] = rnd(3, 32)  # modules_to_save copies
        tensors[f"{p}score.bias"] = rnd(3)
    path = root / "peft_in"
    path.mkdir()
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "use_rslora": rslora,
        # peft's matching: a key covers whole dotted components at the end of the name (so "_proj"
        # and "ate_proj" match nothing), may be a regex, and the first matching key wins
        "use_dora": dora, "rank_pattern": {"_proj": 1, "model.layers.1.self_attn.q_proj": 2, "v_proj": 6},
        "alpha_pattern": {"ate_proj": 100, "model.layers.1.self_attn.q_proj": 3, "v_proj": 5,
                          r"layers\.\d\.mlp\..*": 6, "down_proj": 7},
        "target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens", "conv"],
        "modules_to_save": None if dora else ["score"], "base_model_name_or_path": "tiny/llama",
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    ranks = {n: r for n, (r, _, _) in linear.items()}
    if not dora:
        ranks |= {"model.embed_tokens": 4, "model.conv": 4}
    alphas = {n: 8 for n in ranks} | {"model.layers.0.self_attn.v_proj": 5, "model.layers.1.self_attn.v_proj": 5,
                                       "model.layers.1.self_attn.q_proj": 3, "model.layers.1.mlp.down_proj": 6}
    return path, {n: alphas[n] / (math.sqrt(r) if rslora else r) for n, r in ranks.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rslora", [False, True], ids=["plain", "rslora"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_roundtrip_bit_identical(tmp_path: Path, dtype: torch.dtype, rslora: bool, dora: bool) -> None:
    src, scales = make_peft_dir(tmp_path, dtype, rslora=rslora, dora=dora)
    first = loratool.read(src)
    assert {n: m.scale for n, m in first.modules.items()} == scales
    out = loratool.write(first, tmp_path / "out", fmt="peft")
    again = loratool.read(out)

    assert list(again.modules) == list(first.modules)
    for name, m in first.modules.items():
        assert_same_module(m, again.modules[name])
        assert again.modules[name].scale == scales[name]
    assert set(again.extras) == set(first.extras)
    for key, ref in first.extras.items():
        assert torch.equal(ref.load(), again.extras[key].load()), key
    # every tensor of the source file is in the output under the same key, bit for bit
    before = load_file(str(src / "adapter_model.safetensors"))
    after = load_file(str(out / "adapter_model.safetensors"))
    assert set(after) == set(before)
    for key, t in before.items():
        assert after[key].dtype == t.dtype and torch.equal(after[key], t), key
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] is rslora and config["use_dora"] is dora
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == "tiny/llama"
    assert config["modules_to_save"] == (None if dora else ["score"])


def test_peft_written_patterns_override_source_patterns(tmp_path: Path) -> None:
    """Modules that no longer follow the source config's r / patterns get exact patterns."""
    src, _ = make_peft_dir(tmp_path, torch.float32, rslora=False)
    adapter = loratool.read(src)
    modules = dict(adapter.modules)
    v = "model.layers.0.self_attn.v_proj"  # source: "v_proj" pattern r 6 alpha 5
    down, up = modules[v].down.load(), modules[v].up.load()
    modules[v] = modules[v].with_(down=TensorRef.from_tensor(down[:3].clone()),
                                  up=TensorRef.from_tensor(up[:, :3].clone()), alpha=1.5)
    out = loratool.write(adapter.with_modules(modules), tmp_path / "out", fmt="peft")
    again = loratool.read(out)
    m = again.modules[v]
    assert (m.rank, m.alpha, m.scale) == (3, 1.5, 0.5)
    assert again.modules["model.layers.1.self_attn.v_proj"].rank == 6  # the other v_proj keeps its own
    assert again.modules["model.layers.1.self_attn.v_proj"].scale == 5 / 6
    for name, mod in modules.items():
        assert torch.equal(delta(again.modules[name]), delta(mod)), name


# ---------------------------------------------------------------------------------------------
# kohya


KOHYA_META = {"ss_network_dim": "4", "ss_network_alpha": "2", "ss_base_model_version": "sd_v1",
              "modelspec.architecture": "stable-diffusion-v1/lora"}


def make_kohya_file(path: Path) -> dict[str, float]:
    """An SD-like kohya file: bf16 factors, float32 0-d alphas, one module without alpha, 3x3 and
    1x1 convs. Returns the expected scale per module."""
    g = torch.Generator().manual_seed(1)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g).to(torch.bfloat16)

    # name -> (down shape, up shape, alpha or None)
    spec: dict[str, tuple[tuple[int, ...], tuple[int, ...], float | None]] = {
        "lora_unet_down_blocks_0_attentions_0_proj_in": ((4, 32), (32, 4), 2.0),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": ((4, 32), (32, 4), 2.0),
        "lora_unet_down_blocks_0_resnets_0_conv1": ((4, 8, 3, 3), (16, 4, 1, 1), 1.0),
        "lora_unet_down_blocks_0_resnets_0_conv_shortcut": ((2, 8, 1, 1), (16, 2, 1, 1), 0.5),
        "lora_te1_text_model_encoder_layers_0_self_attn_k_proj": ((8, 24), (24, 8), None),
    }
    tensors: dict[str, torch.Tensor] = {}
    scales = {}
    for name, (dshape, ushape, alpha) in spec.items():
        tensors[f"{name}.lora_down.weight"] = rnd(*dshape)
        tensors[f"{name}.lora_up.weight"] = rnd(*ushape)
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        scales[name] = (alpha if alpha is not None else dshape[0]) / dshape[0]
    save_file(tensors, str(path), metadata=KOHYA_META)
    return scales


def test_kohya_roundtrip_bit_identical(tmp_path: Path) -> None:
    src = tmp_path / "in.safetensors"
    scales = make_kohya_file(src)
    first = loratool.read(src)
    assert {n: m.scale for n, m in first.modules.items()} == scales
    assert {n: m.kind for n, m in first.modules.items() if "resnets" in n} == {
        "lora_unet_down_blocks_0_resnets_0_conv1": "conv", "lora_unet_down_blocks_0_resnets_0_conv_shortcut": "conv"}
    out = loratool.write(first, tmp_path / "out.safetensors", fmt="kohya")
    again = loratool.read(out)
    assert list(again.modules) == list(first.modules)
    for name, m in first.modules.items():
        assert_same_module(m, again.modules[name])
        assert again.modules[name].scale == scales[name]

    before, after = load_file(str(src)), load_file(str(out))
    for name in scales:
        for suffix in (".lora_down.weight", ".lora_up.weight"):
            assert after[name + suffix].dtype == torch.bfloat16
            assert torch.equal(after[name + suffix], before[name + suffix]), name + suffix
        # alpha is written for every module (implied ones as alpha = rank), as a float32 scalar
        alpha = after[name + ".alpha"]
        assert alpha.dtype == torch.float32 and alpha.shape == (), name
        rank = before[name + ".lora_down.weight"].shape[0]
        assert alpha.item() == scales[name] * rank, name
    assert set(after) == set(before) | {"lora_te1_text_model_encoder_layers_0_self_attn_k_proj.alpha"}
    meta = header_metadata(out)
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == "Dynamic"
    # the one 3x3 conv (rank 4, alpha 1) is described by kohya's conv_dim / conv_alpha
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "1"}


def test_kohya_overwrite_own_input_is_refused(tmp_path: Path) -> None:
    """Writing over one's own input, even with force, is refused (issue #12): the input stays byte-identical."""
    src = tmp_path / "lora.safetensors"
    make_kohya_file(src)
    before = src.read_bytes()
    with pytest.raises(IncompatibleError, match="is an input of this command"):
        loratool.write(loratool.read(src), src, fmt="kohya", force=True)
    assert src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]


def test_rslora_peft_to_kohya_keeps_scale(tmp_path: Path) -> None:
    src, scales = make_peft_dir(tmp_path, torch.bfloat16, rslora=True, dora=True)
    adapter = loratool.read(src)
    out = loratool.write(adapter, tmp_path / "out.safetensors", fmt="kohya")
    again = loratool.read(out)
    tensors = load_file(str(out))
    assert len(again.modules) == len(scales)
    for name, scale in scales.items():
        m = again.modules["lora_unet_" + name.replace(".", "_")]
        assert not m.rslora
        alpha = tensors[m.name + ".alpha"]
        assert alpha.dtype == torch.float32 and alpha.shape == ()
        # kohya's scale is alpha / r: alpha is converted to scale · r, then stored as float32
        assert alpha.item() == torch.tensor(scale * m.rank, dtype=torch.float32).item()
        assert m.scale == pytest.approx(scale, rel=2**-24), name
        if scale * m.rank == 16.0:  # representable: exact
            assert m.scale == scale
        assert torch.equal(m.magnitude.load().reshape(-1), adapter.modules[name].magnitude.load()), name  # type: ignore[union-attr]
    meta = header_metadata(out)
    assert meta["ss_network_alpha"] == "Dynamic"  # the converted alphas differ per rank


def test_uniform_rslora_to_kohya_metadata_alpha_is_converted(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(2)
    path = tmp_path / "in"
    path.mkdir()
    save_file({"base_model.model.l.0.q.lora_A.weight": torch.randn(4, 8, generator=g),
               "base_model.model.l.0.q.lora_B.weight": torch.randn(8, 4, generator=g)},
              str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                          "use_rslora": True, "target_modules": ["q"]}))
    out = loratool.write(loratool.read(path), tmp_path / "k.safetensors", fmt="kohya")
    meta = header_metadata(out)
    # rslora scale 8 / sqrt(4) = 4 -> kohya alpha 16; the metadata must agree with the tensors
    assert load_file(str(out))["lora_unet_l_0_q.alpha"].item() == 16.0
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "16")


def test_kohya_refuses_embedding_and_fan_in_fan_out(tmp_path: Path) -> None:
    src, _ = make_peft_dir(tmp_path, torch.float32, rslora=False)
    with pytest.raises(IncompatibleError, match="embed_tokens"):
        loratool.write(loratool.read(src), tmp_path / "k.safetensors", fmt="kohya")
    assert not (tmp_path / "k.safetensors").exists()
    assert leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# provenance


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_provenance_metadata(tmp_path: Path, fmt: str) -> None:
    if fmt == "peft":
        src, _ = make_peft_dir(tmp_path, torch.float32, rslora=False)
        sources = [src / "adapter_model.safetensors", src / "adapter_config.json"]
        out = loratool.write(loratool.read(src), tmp_path / "out", fmt="peft", op="convert",
                             params={"to": "peft", "rank": 4})
        written = out / "adapter_model.safetensors"
    else:
        src = tmp_path / "in.safetensors"
        make_kohya_file(src)
        sources = [src]
        written = out = loratool.write(loratool.read(src), tmp_path / "out.safetensors", fmt="kohya",
                                       op="convert", params={"to": "peft", "rank": 4})
    meta = header_metadata(written)
    assert set(meta) >= PROVENANCE_KEYS
    assert meta["loratool.version"] == loratool.__version__
    assert meta["loratool.op"] == "convert"
    assert json.loads(meta["loratool.params"]) == {"to": "peft", "rank": 4}
    assert json.loads(meta["loratool.sources"]) == {f"{s.parent.name}/{s.name}": sha256(s) for s in sources}


def test_provenance_default_op_and_explicit_sources(tmp_path: Path) -> None:
    src = tmp_path / "in.safetensors"
    make_kohya_file(src)
    other = tmp_path / "other.bin"
    other.write_bytes(b"base model bytes")
    out = loratool.write(loratool.read(src), tmp_path / "o.safetensors", sources=[src, other])
    meta = header_metadata(out)
    assert meta["loratool.op"] == "write"
    assert json.loads(meta["loratool.params"]) == {}
    assert json.loads(meta["loratool.sources"]) == {f"{p.parent.name}/{p.name}": sha256(p) for p in (src, other)}


# ---------------------------------------------------------------------------------------------
# existing outputs and atomicity


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_existing_output_refused_then_replaced_with_force(tmp_path: Path, fmt: str) -> None:
    src = tmp_path / "in.safetensors"
    make_kohya_file(src)
    adapter = loratool.read(src)
    out = tmp_path / ("out" if fmt == "peft" else "out.safetensors")
    loratool.write(adapter, out, fmt=fmt)
    if fmt == "peft":
        (out / "stale.txt").write_text("from an older run")
    snapshot = {p.name: p.read_bytes() for p in ([*out.iterdir()] if out.is_dir() else [out])}

    with pytest.raises(OutputExistsError, match="already exists"):
        loratool.write(adapter, out, fmt=fmt)
    assert {p.name: p.read_bytes() for p in ([*out.iterdir()] if out.is_dir() else [out])} == snapshot

    smaller = adapter.with_modules(dict(list(adapter.modules.items())[:2]))
    if fmt == "peft":  # a folder holding anything but adapter files is not ours to replace (issue #12)
        with pytest.raises(OutputExistsError, match=r"refusing to replace it: .*\(stale\.txt\)"):
            loratool.write(smaller, out, fmt=fmt, force=True)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == snapshot
        (out / "stale.txt").unlink()
    loratool.write(smaller, out, fmt=fmt, force=True)
    assert list(loratool.read(out).modules) == list(smaller.modules)
    if fmt == "peft":
        assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert leftovers(tmp_path) == []


class BrokenRef(TensorRef):
    """A tensor whose bytes cannot be read: load() raises, as a vanished or unreadable file would."""

    def __init__(self, like: TensorRef, exc: BaseException) -> None:
        super().__init__(like.shape, like.dtype, None, None)
        self.exc = exc

    def load(self) -> torch.Tensor:
        raise self.exc


def _break_last_module(adapter: Adapter, exc: BaseException) -> Adapter:
    modules = dict(adapter.modules)
    name = list(modules)[-1]
    modules[name] = modules[name].with_(up=BrokenRef(modules[name].up, exc))
    return adapter.with_modules(modules)


FAILURES: list[Callable[[], BaseException]] = [lambda: OSError("disk gone"), lambda: KeyboardInterrupt()]


@pytest.mark.parametrize("make_exc", FAILURES, ids=["oserror", "ctrl-c"])
@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_failed_write_leaves_nothing(tmp_path: Path, fmt: str, make_exc: Callable[[], BaseException]) -> None:
    src = tmp_path / "in.safetensors"
    make_kohya_file(src)
    digest = sha256(src)
    exc = make_exc()
    broken = _break_last_module(loratool.read(src), exc)
    out = tmp_path / ("out" if fmt == "peft" else "out.safetensors")
    with pytest.raises(type(exc)):
        loratool.write(broken, out, fmt=fmt)
    assert not out.exists()
    assert leftovers(tmp_path) == []
    assert sha256(src) == digest


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_failed_write_with_force_keeps_previous_output(tmp_path: Path, fmt: str) -> None:
    src = tmp_path / "in.safetensors"
    make_kohya_file(src)
    adapter = loratool.read(src)
    out = loratool.write(adapter, tmp_path / ("out" if fmt == "peft" else "out.safetensors"), fmt=fmt)
    files = [*out.iterdir()] if out.is_dir() else [out]
    snapshot = {p.name: p.read_bytes() for p in files}
    with pytest.raises(OSError):
        loratool.write(_break_last_module(adapter, OSError("disk gone")), out, fmt=fmt, force=True)
    assert {p.name: p.read_bytes() for p in ([*out.iterdir()] if out.is_dir() else [out])} == snapshot
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_failure_after_the_bytes_are_written_leaves_nothing(
    tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is complete in its temporary place, then the re-read check fails: no output."""
    import loratool.formats as formats

    src = tmp_path / "in.safetensors"
    make_kohya_file(src)
    digest = sha256(src)
    adapter = loratool.read(src)
    seen: list[Path] = []

    def failing_check(path: Any, **kwargs: Any) -> Any:
        seen.append(Path(path))
        raise IncompatibleError(f"{path}: simulated validation failure")

    monkeypatch.setattr(formats, "read", failing_check)
    out = tmp_path / ("out" if fmt == "peft" else "out.safetensors")
    with pytest.raises(IncompatibleError, match="simulated"):
        loratool.write(adapter, out, fmt=fmt)
    assert seen and seen[0].name.startswith(f".{out.name}.tmp-")  # it did get that far
    assert not out.exists()
    assert leftovers(tmp_path) == []
    assert sha256(src) == digest


# ---------------------------------------------------------------------------------------------
# property: any small adapter survives PEFT write -> read with the same deltas


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@st.composite
def adapters(draw: st.DrawFn, *, mixed_rslora: bool = False) -> Adapter:
    dtype = DTYPES[draw(st.sampled_from(list(DTYPES)))]
    fan_in_fan_out = draw(st.booleans())
    rslora = draw(st.booleans())
    n = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    modules: dict[str, LoraModule] = {}
    for i in range(n):
        kind = draw(st.sampled_from(["linear", "linear", "conv", "embedding"]))
        r = draw(st.integers(1, 6))
        fin, fout = draw(st.integers(1, 12)), draw(st.integers(1, 12))
        alpha = draw(st.one_of(st.integers(1, 64).map(float), st.floats(0.01, 100.0, allow_nan=False)))
        if kind == "conv":
            k = draw(st.sampled_from([1, 3]))
            down, up = torch.randn(r, fin, k, k, generator=g), torch.randn(fout, r, 1, 1, generator=g)
        else:
            down, up = torch.randn(r, fin, generator=g), torch.randn(fout, r, generator=g)
        name = f"model.layers.{i}.{kind}_{i}"
        modules[name] = LoraModule(
            name=name, down=TensorRef.from_tensor(down.to(dtype)), up=TensorRef.from_tensor(up.to(dtype)),
            alpha=alpha, alpha_source="config", rslora=draw(st.booleans()) if mixed_rslora else rslora,
            kind=kind, fan_in_fan_out=fan_in_fan_out and kind == "linear",  # type: ignore[arg-type]
        )
    return Adapter(modules=modules, source_format="peft")


def _write_read(adapter: Adapter) -> Adapter:
    with tempfile.TemporaryDirectory() as d:
        out = loratool.write(adapter, Path(d) / "out", fmt="peft")
        again = loratool.read(out)
        # load everything before the directory goes away
        for m in again.modules.values():
            m.down, m.up = TensorRef.from_tensor(m.down.load()), TensorRef.from_tensor(m.up.load())
        return again


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(adapters())
def test_property_peft_roundtrip_preserves_deltas(adapter: Adapter) -> None:
    again = _write_read(adapter)
    assert list(again.modules) == list(adapter.modules)
    for name, m in adapter.modules.items():
        got = again.modules[name]
        assert (got.rank, got.kind, got.fan_in_fan_out, got.dtype) == (m.rank, m.kind, m.fan_in_fan_out, m.dtype)
        assert got.scale == m.scale, name
        assert torch.equal(got.down.load(), m.down.load()) and torch.equal(got.up.load(), m.up.load())
        # expected delta straight from the factors (not loratool.maths): s · up @ down, laid out like the base
        up = m.up.load().float().reshape(m.up.shape[0], -1)
        down = m.down.load().float().reshape(m.rank, -1)
        expected = (up @ down) * (m.alpha / (math.sqrt(m.rank) if m.rslora else m.rank))
        expected = expected.T if m.kind == "embedding" or m.fan_in_fan_out else expected.reshape(
            m.out_features, m.in_features, *m.kernel)
        assert torch.equal(delta(got), expected), name


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(adapters(mixed_rslora=True))
def test_property_peft_roundtrip_mixed_rslora_keeps_scales(adapter: Adapter) -> None:
    """use_rslora is one flag per PEFT adapter: modules on the other convention get converted
    alphas whose scale matches to rounding."""
    again = _write_read(adapter)
    for name, m in adapter.modules.items():
        got = again.modules[name]
        assert got.scale == pytest.approx(m.scale, rel=1e-12), name
        torch.testing.assert_close(delta(got), delta(m), rtol=1e-6, atol=0)


def test_peft_rewrite_keeps_the_configs_own_r(tmp_path: Path) -> None:
    """r = 8 with two modules at 4 (rank_pattern): a read -> write keeps r = 8 rather than the most
    common rank, and every module its rank; once no module has rank 8, the most common rank is used."""
    g = torch.Generator().manual_seed(1)
    p = "base_model.model.model.layers.0."
    ranks = {"self_attn.q_proj": 8, "self_attn.k_proj": 4, "self_attn.v_proj": 4}
    tensors = {}
    for name, r in ranks.items():
        tensors[f"{p}{name}.lora_A.weight"] = torch.randn(r, 16, generator=g)
        tensors[f"{p}{name}.lora_B.weight"] = torch.randn(16, r, generator=g)
    src = tmp_path / "in"
    src.mkdir()
    save_file(tensors, str(src / "adapter_model.safetensors"))
    (src / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 8, "lora_alpha": 8, "rank_pattern": {"k_proj": 4, "v_proj": 4},
        "target_modules": ["q_proj", "k_proj", "v_proj"]}))
    first = loratool.read(src)
    out = loratool.write(first, tmp_path / "out", fmt="peft")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and sorted(config["rank_pattern"].values()) == [4, 4]
    again = loratool.read(out)
    assert {n: m.rank for n, m in again.modules.items()} == {n: m.rank for n, m in first.modules.items()}
    assert {n: m.scale for n, m in again.modules.items()} == {n: m.scale for n, m in first.modules.items()}
    without_q = first.with_modules({n: m for n, m in first.modules.items() if not n.endswith("q_proj")})
    config = json.loads((loratool.write(without_q, tmp_path / "out2", fmt="peft") / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["rank_pattern"] == {}
