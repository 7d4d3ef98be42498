"""The format registry: one record per format, one check for what a format can hold, CLI choices.

Regression tests for issue #14 item 1: before the registry, writing kohya from convert, resize or
rescale silently dropped lora_bias deltas, resize/rescale to kohya dropped modules_to_save tensors,
and `--format diffusers` was refused by the CLI although the library wrote diffusers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import loratool
from loratool.errors import IncompatibleError
from loratool.formats import (
    Capabilities,
    Format,
    check_writable,
    format_names,
    get_format,
    registry,
    writable_formats,
)
from loratool.ops.convert import convert
from loratool.ops.rescale import rescale
from loratool.ops.resize import resize

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
Q = "model.layers.0.self_attn.q_proj"


def _with_bias(make_adapter) -> Path:
    """A PEFT adapter whose q_proj carries a lora_B.bias (peft's lora_bias=True)."""
    path = make_adapter(fmt="peft", modules={Q: (32, 32), "model.layers.0.self_attn.v_proj": (16, 32)})
    sd = load_file(str(path / "adapter_model.safetensors"))
    sd[f"base_model.model.{Q}.lora_B.bias"] = torch.randn(32, generator=torch.Generator().manual_seed(3))
    save_file(sd, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**cfg, "lora_bias": True}))
    return path


def _with_lm_head(make_adapter) -> Path:
    """A PEFT adapter with a modules_to_save copy of lm_head."""
    return make_adapter(fmt="peft", modules={Q: (32, 32)}, config={"modules_to_save": ["lm_head"]},
                        extra_tensors={"base_model.model.lm_head.weight": torch.randn(50, 32)})


WRITES = {
    "convert": lambda src, out: convert(src, out, to="kohya"),
    "resize": lambda src, out: resize(src, out, rank=2, fmt="kohya"),
    "rescale": lambda src, out: rescale(src, out, mode="factor", value=0.5, fmt="kohya"),
}


@pytest.mark.parametrize("op", sorted(WRITES))
def test_kohya_output_keeps_lora_bias_as_diff_b(make_adapter, tmp_path, op):
    # kohya files hold a bias delta as ComfyUI's unscaled `.diff_b` (issue #15): the bias as applied,
    # scale · lora_B.bias, times the operation's own factor (rescale 0.5), is kept, never dropped
    src = _with_bias(make_adapter)
    out = tmp_path / "k.safetensors"
    WRITES[op](src, out)
    bias = load_file(str(src / "adapter_model.safetensors"))[f"base_model.model.{Q}.lora_B.bias"]
    scale = 8 / 4  # the factory's alpha / rank
    factor = 0.5 if op == "rescale" else 1.0
    got = load_file(str(out))["lora_unet_model_layers_0_self_attn_q_proj.diff_b"]
    torch.testing.assert_close(got, bias * scale * factor)


@pytest.mark.parametrize("op", sorted(WRITES))
def test_kohya_output_refuses_modules_to_save(make_adapter, tmp_path, op):
    src = _with_lm_head(make_adapter)
    out = tmp_path / "k.safetensors"
    with pytest.raises(IncompatibleError, match=r"'lm_head.weight' is a modules_to_save tensor.*kohya"):
        WRITES[op](src, out)
    assert not out.exists()


def test_the_same_content_is_written_where_it_fits(make_adapter, tmp_path):
    # the refusals above are about the format, not the operation: PEFT holds both
    src = _with_bias(make_adapter)
    rescale(src, tmp_path / "p", mode="factor", value=0.5, fmt="peft")
    with safe_open(str(tmp_path / "p" / "adapter_model.safetensors"), "pt") as f:
        assert f"base_model.model.{Q}.lora_B.bias" in f.keys()  # noqa: SIM118
    src = _with_lm_head(make_adapter)
    resize(src, tmp_path / "r", rank=2, fmt="peft")
    with safe_open(str(tmp_path / "r" / "adapter_model.safetensors"), "pt") as f:
        assert "base_model.model.lm_head.weight" in f.keys()  # noqa: SIM118


def _choices(command: click.Command, option: str) -> tuple[str, ...]:
    param = next(p for p in command.params if p.name == option)
    assert isinstance(param.type, click.Choice)
    return tuple(param.type.choices)


def test_cli_format_choices_come_from_the_registry():
    from loratool.cli import cli

    assert "diffusers" in writable_formats()
    for name in ("rescale", "resize", "combine"):
        assert _choices(cli.commands[name], "fmt") == writable_formats(), name
    assert _choices(cli.commands["convert"], "to") == (*writable_formats(), "lora")  # lora: LyCORIS -> LoRA
    # extract names modules by checkpoint paths: the writable formats that do not need components
    assert _choices(cli.commands["extract"], "fmt") == ("peft", "kohya", "mlx", "comfyui")


def test_cli_writes_diffusers(tmp_path):
    out = tmp_path / "d.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "loratool", "rescale", str(FIXTURES / "diffusers_sd.safetensors"), "--factor", "2",
         "--format", "diffusers", "-o", str(out)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    a, b = loratool.read(FIXTURES / "diffusers_sd.safetensors"), loratool.read(out)
    assert b.source_format == "diffusers" and list(a.modules) == list(b.modules)
    for name, m in a.modules.items():
        assert b.modules[name].scale == pytest.approx(2 * m.scale, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# the registry itself


def test_every_builtin_format_has_a_complete_record():
    assert format_names()[:3] == ("peft", "kohya", "diffusers") and "mlx" in format_names()
    for name in format_names():
        rec = get_format(name)
        assert rec.name == name and rec.summary and rec.naming in ("path", "component", "stem")
        assert rec.read_file is not None or rec.read_dir is not None
        # a read-only format names the format its adapters are written in
        assert rec.write is not None or (rec.write_as and get_format(rec.write_as).write is not None)
    assert get_format("peft").capabilities.directory and not get_format("kohya").capabilities.directory


def test_unknown_and_read_only_formats_are_refused():
    with pytest.raises(IncompatibleError, match="'onnx'") as exc:
        get_format("onnx", writing=True)
    assert "peft, kohya, diffusers" in (exc.value.hint or "")


def test_check_names_every_capability_with_a_format_that_holds_it(make_adapter):
    adapter = loratool.read(FIXTURES / "peft_gpt2")
    with pytest.raises(IncompatibleError, match=r"fan_in_fan_out.*\(8 such\), which diffusers files cannot hold") as e:
        check_writable(adapter, "diffusers")
    assert "--format peft" in (e.value.hint or "")
    check_writable(adapter, "peft")
    # every kind of problem in one error: peft_cls has embedding LoRA and modules_to_save tensors
    with pytest.raises(IncompatibleError, match=r"kohya files cannot hold .*embedding layer.*; .*modules_to_save"):
        check_writable(loratool.read(FIXTURES / "peft_cls"), "kohya")
    # extras can be left to the caller (convert drops peft's `.base_layer.` copies itself)
    lm = loratool.read(_with_lm_head(make_adapter))
    check_writable(lm, "kohya", extras=False)


@pytest.fixture
def toy_format():
    """A read-only toy format registered for one test: adding a format is adding one record."""
    from loratool.formats import kohya

    def detect(keys: list[str]) -> int:
        return 9 if any(k.endswith(".toy_down") for k in keys) else 0

    def read_file(tf, findings):
        renamed = {k.replace(".toy_down", ".lora_down.weight").replace(".toy_up", ".lora_up.weight"): v
                   for k, v in tf.tensors.items()}
        adapter = kohya.from_tensors(type(tf)(tf.path, renamed, tf.metadata), findings)
        return adapter.with_modules(adapter.modules, source_format="toy")

    record = Format(name="toy", summary="a test format", naming="stem",
                    capabilities=Capabilities(conv=False, per_module_alpha=False), detect=detect, read_file=read_file)
    registry.register(record)
    yield record
    registry._REGISTRY.pop("toy")


def test_a_registered_format_is_detected_read_and_refused_for_writing(tmp_path, toy_format):
    path = tmp_path / "t.safetensors"
    save_file({"lora_unet_a.toy_down": torch.ones(2, 8), "lora_unet_a.toy_up": torch.ones(8, 2)}, str(path))
    assert loratool.detect(path) == "toy"
    adapter = loratool.read(path)
    assert adapter.source_format == "toy" and adapter.modules["lora_unet_a"].rank == 2
    assert "toy" in format_names() and "toy" not in writable_formats()
    with pytest.raises(IncompatibleError, match="does not write"):
        loratool.write(adapter, tmp_path / "o.safetensors")
    loratool.write(adapter, tmp_path / "o.safetensors", fmt="kohya")


def test_one_alpha_formats_refuse_mixed_scales(tmp_path):
    adapter = loratool.read(FIXTURES / "kohya_sd.safetensors")
    first = next(iter(adapter.modules))
    mixed = adapter.with_modules({n: m.with_(alpha=float(m.rank) * (2 if n == first else 1))
                                  for n, m in adapter.modules.items()})
    same = adapter.with_modules({n: m.with_(alpha=float(m.rank)) for n, m in adapter.modules.items()})
    registry.register(Format(name="one_alpha", summary="x", naming="stem",
                             capabilities=Capabilities(per_module_alpha=False), write=lambda *a: None))
    try:
        with pytest.raises(IncompatibleError, match="different scales"):
            check_writable(mixed, "one_alpha")
        check_writable(same, "one_alpha")
    finally:
        registry._REGISTRY.pop("one_alpha")


def test_the_capability_table_in_the_docs_is_the_registry():
    """docs/formats.md "What each format can hold" states each record's capabilities."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "formats.md").read_text()
    section = text.split("## What each format can hold", 1)[1].split("\n## ", 1)[0]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines()
            if line.startswith("|") and not line.startswith("|---")]
    columns = rows[0][1:]
    assert columns == list(writable_formats())
    fields = {"LoRA bias deltas": "bias", "`modules_to_save` tensors": "extras", "embedding LoRA": "embedding",
              "`fan_in_fan_out`": "fan_in_fan_out", "conv layers": "conv",
              "DoRA (magnitude per input column)": "dora_in", "DoRA": "dora",
              "per-module alpha": "per_module_alpha", "LyCORIS full / norm diffs": "diffs"}
    seen = set()
    for row in rows[1:]:
        label, cells = row[0], row[1:]
        if label == "output":
            for name, cell in zip(columns, cells):
                assert (cell == "directory") == get_format(name).capabilities.directory, (name, cell)
            continue
        field = next((f for prefix, f in fields.items() if label.startswith(prefix)), None)
        if field is None:
            continue
        seen.add(field)
        for name, cell in zip(columns, cells):
            assert cell.startswith("yes") == getattr(get_format(name).capabilities, field), (label, name, cell)
    assert seen == set(fields.values())


def test_two_modules_with_one_kohya_name_are_a_user_error(tmp_path):
    """unet.x and transformer.x both become lora_unet_x: the kohya writer raised a bare ValueError
    (exit 3 from resize / rescale --format kohya); it is a clean IncompatibleError naming both."""
    tensors = {}
    for component in ("unet", "transformer"):
        tensors[f"{component}.blocks.0.to_q.lora_A.weight"] = torch.randn(2, 8)
        tensors[f"{component}.blocks.0.to_q.lora_B.weight"] = torch.randn(8, 2)
    save_file(tensors, str(tmp_path / "d.safetensors"))
    with pytest.raises(IncompatibleError, match=r"'(unet|transformer)\.blocks\.0\.to_q' and '(unet|transformer)\.blocks"
                       r"\.0\.to_q' have the same kohya name 'lora_unet_blocks_0_to_q'"):
        rescale(tmp_path / "d.safetensors", tmp_path / "k.safetensors", mode="factor", value=2.0, fmt="kohya")
    assert not (tmp_path / "k.safetensors").exists()
