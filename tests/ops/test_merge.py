"""merge: exactness against peft's merge_and_unload and numpy, streaming layout, atomicity, errors."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from clirun import run_cli
from safetensors.torch import load_file, save_file

import loratool
from loratool.ops.merge import merge

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def tree_hash(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


# ---------------------------------------------------------------------------------------------
# tiny transformers models + real peft adapters (no downloads)


def _llama(dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).to(dtype)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=96, n_positions=64))


def _distilbert():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    cfg = DistilBertConfig(
        dim=32, hidden_dim=64, n_layers=2, n_heads=4, vocab_size=96, max_position_embeddings=64, num_labels=3
    )
    return DistilBertForSequenceClassification(cfg)


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    "llama-rslora-patterns": (
        _llama,
        dict(
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=LLAMA_TARGETS,
            rank_pattern={"q_proj": 6},
            alpha_pattern={"down_proj": 3},
        ),
    ),
    "llama-embeddings": (_llama, dict(r=4, lora_alpha=16, target_modules=["q_proj", "embed_tokens", "lm_head"])),
    "gpt2-fan-in-fan-out": (
        _gpt2,
        dict(r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc"]),
    ),
    "distilbert-modules-to-save": (
        _distilbert,
        dict(r=4, lora_alpha=8, target_modules=["q_lin", "v_lin"], modules_to_save=["classifier"], task_type="SEQ_CLS"),
    ),
    "llama-dora": (_llama, dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])),
}


def make_case(name, tmp: Path, dtype=torch.float32, seed=1):
    from peft import LoraConfig, get_peft_model

    build, kwargs = CASES[name]
    base = build(dtype) if build is _llama else build()
    base_dir = tmp / "base"
    base.save_pretrained(base_dir)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(
            build(dtype) if build is _llama else build(), LoraConfig(init_lora_weights=False, **kwargs)
        )
        if name == "llama-dora":  # a non-trivial magnitude, so the row norm matters
            for mod in peft_model.modules():
                if hasattr(mod, "lora_magnitude_vector") and "default" in mod.lora_magnitude_vector:
                    with torch.no_grad():
                        mod.lora_magnitude_vector["default"].weight.mul_(1.3)
        if name == "distilbert-modules-to-save":
            with torch.no_grad():
                peft_model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
        peft_model.save_pretrained(tmp / "adapter", save_embedding_layers=False)
    return base_dir, tmp / "adapter"


def reference_merge(base_dir, adapter_dir, cls_name):
    import transformers
    from peft import PeftModel

    cls = getattr(transformers, cls_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(cls.from_pretrained(base_dir), adapter_dir)
    return model, model.merge_and_unload()


CLS = {
    "llama-rslora-patterns": "LlamaForCausalLM",
    "llama-embeddings": "LlamaForCausalLM",
    "gpt2-fan-in-fan-out": "GPT2LMHeadModel",
    "distilbert-modules-to-save": "DistilBertForSequenceClassification",
    "llama-dora": "LlamaForCausalLM",
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_merge_equals_peft_merge_and_unload(tmp_path, case):
    import transformers

    base_dir, adapter_dir = make_case(case, tmp_path)
    x = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        _, merged = reference_merge(base_dir, adapter_dir, CLS[case])
        merged.eval()
        expected_logits = merged(x).logits
    report = merge(base_dir, [adapter_dir], tmp_path / "out")
    assert report.merged > 0
    ours = load_file(str(tmp_path / "out" / "model.safetensors"))
    ref = {k: v for k, v in merged.state_dict().items() if k in ours}
    assert set(ref) == set(ours) - {"lm_head.weight"} or set(ref) == set(ours)
    for key, value in ref.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=1e-6, msg=key)
    cls = getattr(transformers, CLS[case])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = cls.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, expected_logits, rtol=0, atol=1e-5)
    for name in ("config.json",):
        assert (tmp_path / "out" / name).read_bytes() == (base_dir / name).read_bytes()


@pytest.mark.slow
def test_bf16_base_is_bit_identical_to_peft(tmp_path):
    """peft on CPU adds the fp32 delta once into the bf16 weight; we accumulate in fp32 and cast once."""
    base_dir, adapter_dir = make_case("llama-rslora-patterns", tmp_path, dtype=torch.bfloat16)
    # the adapter saved from a bf16 model is bf16; upcast its factors to fp32 as peft's autocast does
    st = adapter_dir / "adapter_model.safetensors"
    save_file({k: v.float() for k, v in load_file(str(st)).items()}, str(st))
    _, merged = reference_merge(base_dir, adapter_dir, "LlamaForCausalLM")
    merge(base_dir, [adapter_dir], tmp_path / "out")
    ours = load_file(str(tmp_path / "out" / "model.safetensors"))
    for key, value in merged.state_dict().items():
        assert ours[key].dtype == torch.bfloat16
        assert torch.equal(ours[key], value), key


def test_two_adapters_weighted_sum_and_sharded_layout(tmp_path):
    """Fixture base_llama is sharded: the output keeps shards, index, key order and dtypes."""
    b_dir = tmp_path / "second"
    # two plain adapters: peft_llama with 0.7 and a rescaled copy of it (×−1.5) with 0.3
    from loratool.ops.rescale import rescale

    rescale(FIXTURES / "peft_llama", b_dir, mode="factor", value=-1.5)
    report = merge(FIXTURES / "base_llama", [FIXTURES / "peft_llama", b_dir], tmp_path / "out", weights=[0.7, 0.3])
    assert report.files == 2
    src_index = json.loads((FIXTURES / "base_llama" / "model.safetensors.index.json").read_text())
    out_index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert out_index["weight_map"] == src_index["weight_map"]
    from loratool.io.header import read_header

    for shard in sorted(set(src_index["weight_map"].values())):
        src_h = read_header(FIXTURES / "base_llama" / shard)
        out_h = read_header(tmp_path / "out" / shard)
        assert list(out_h.tensors) == list(src_h.tensors)  # key order
        assert [i.dtype for i in out_h.tensors.values()] == [i.dtype for i in src_h.tensors.values()]
        assert "loratool.sources" in out_h.metadata
        src_sha = hashlib.sha256((FIXTURES / "base_llama" / shard).read_bytes()).hexdigest()
        assert json.loads(out_h.metadata["loratool.sources"])[f"base_llama/{shard}"] == src_sha
    for name in ("config.json", "generation_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (FIXTURES / "base_llama" / name).read_bytes()
    # numpy reference: W + 0.7 ΔW + 0.3 (−1.5 ΔW), accumulated in float64, compared after the bf16 cast
    base = {}
    for shard in set(src_index["weight_map"].values()):
        base.update(load_file(str(FIXTURES / "base_llama" / shard)))
    out = {}
    for shard in set(src_index["weight_map"].values()):
        out.update(load_file(str(tmp_path / "out" / shard)))
    from peft.utils.other import get_pattern_key

    cfg = json.loads((FIXTURES / "peft_llama" / "adapter_config.json").read_text())
    raw = load_file(str(FIXTURES / "peft_llama" / "adapter_model.safetensors"))
    changed = 0
    for key in base:
        mod = key[: -len(".weight")]
        a_key = f"base_model.model.{mod}.lora_A.weight"
        if a_key not in raw:
            assert torch.equal(out[key], base[key]), key  # copied byte for byte
            continue
        A = raw[a_key].double().numpy()
        B = raw[a_key.replace("lora_A", "lora_B")].double().numpy()
        alpha = cfg["alpha_pattern"].get(get_pattern_key(list(cfg["alpha_pattern"]), mod), cfg["lora_alpha"])
        scale = alpha / A.shape[0]
        ref = base[key].double().numpy() + (0.7 + 0.3 * -1.5) * scale * (B @ A)
        expected = torch.from_numpy(ref).float().to(torch.bfloat16)
        diff = (out[key].float() - expected.float()).abs().max().item()
        # the only difference allowed is one bf16 rounding step of the float32 accumulation
        assert diff <= float(expected.float().abs().max()) * 2**-7, key
        changed += 1
    assert changed == report.merged


def test_direct_io_merge_writes_the_buffered_bytes(tmp_path, monkeypatch):
    """Large outputs are written with O_DIRECT (writers.DIRECT_MIN_BYTES); forced on for these small
    files, with 8 KiB staging chunks, every output file equals the buffered merge's byte for byte."""
    from loratool.io import writers

    args = (FIXTURES / "base_llama", [FIXTURES / "peft_llama", FIXTURES / "peft_llama"])
    (tmp_path / "buffered").mkdir()
    (tmp_path / "direct").mkdir()
    merge(*args, tmp_path / "buffered" / "out", weights=[0.7, 0.3])
    monkeypatch.setattr(writers, "DIRECT_MIN_BYTES", 0)
    monkeypatch.setattr(writers, "_STAGE_BYTES", 8192)
    merge(*args, tmp_path / "direct" / "out", weights=[0.7, 0.3])
    a, b = tmp_path / "buffered" / "out", tmp_path / "direct" / "out"
    names = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert any(str(n).endswith(".safetensors") for n in names)
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


def _kohya_sd_reference(base_path: Path, lora_path: Path, weight: float) -> dict[str, np.ndarray]:
    """Independent numpy merge of a kohya file into an SD-style single-file base, by name rules."""
    base = load_file(str(base_path))
    lora = load_file(str(lora_path))
    prefixes = {"lora_unet_": "model.diffusion_model.", "lora_te1_": "conditioner.embedders.0.transformer."}
    norm = {k[: -len(".weight")].replace(".", "_"): k for k in base if k.endswith(".weight")}
    out = {k: v.double().numpy() for k, v in base.items()}
    for key in lora:
        if not key.endswith(".lora_down.weight"):
            continue
        stem = key[: -len(".lora_down.weight")]
        pre = next(p for p in prefixes if stem.startswith(p))
        target = norm[prefixes[pre].replace(".", "_") + stem[len(pre) :]]
        down = lora[key].double().numpy()
        up = lora[stem + ".lora_up.weight"].double().numpy()
        r = down.shape[0]
        alpha = float(lora[stem + ".alpha"]) if stem + ".alpha" in lora else r
        d = (up.reshape(up.shape[0], r) @ down.reshape(r, -1)) * alpha / r * weight
        out[target] = out[target] + d.reshape(out[target].shape)
    return out


def test_kohya_into_sd_single_file_matches_numpy(tmp_path):
    merge(
        FIXTURES / "base_sd.safetensors",
        [FIXTURES / "kohya_sd.safetensors"],
        tmp_path / "sd.safetensors",
        weights=[0.8],
    )
    ref = _kohya_sd_reference(FIXTURES / "base_sd.safetensors", FIXTURES / "kohya_sd.safetensors", 0.8)
    ours = load_file(str(tmp_path / "sd.safetensors"))
    base = load_file(str(FIXTURES / "base_sd.safetensors"))
    assert any(v.dim() == 4 and not torch.equal(ours[k], base[k]) for k, v in base.items())  # a conv changed
    for key, value in ref.items():
        expected = torch.from_numpy(value).to(base[key].dtype)
        assert ours[key].dtype == base[key].dtype
        tol = float(np.abs(value).max()) * 2**-10 + 1e-6  # one fp16 rounding
        assert (ours[key].double() - expected.double()).abs().max().item() <= tol, key


def test_unmerge_restores_base_up_to_rounding(tmp_path):
    merge(FIXTURES / "base_gpt2", [FIXTURES / "peft_gpt2"], tmp_path / "m")
    merge(tmp_path / "m", [FIXTURES / "peft_gpt2"], tmp_path / "u", unmerge=True)
    base = load_file(str(FIXTURES / "base_gpt2" / "model.safetensors"))
    back = load_file(str(tmp_path / "u" / "model.safetensors"))
    for key in base:
        torch.testing.assert_close(back[key], base[key], rtol=0, atol=1e-6)


def test_unmerge_refused_for_dora(tmp_path, capsys):
    code, _, err = run_cli(["merge", FIXTURES / "base_llama", FIXTURES / "peft_dora", "-o", tmp_path / "o", "--unmerge"]
    )
    assert code == 2
    assert "DoRA" in err and err.count("Error:") == 1
    assert not (tmp_path / "o").exists()


def test_unmatched_modules_are_an_error_listing_names(tmp_path, capsys):
    code, _out, err = run_cli(["merge", FIXTURES / "base_gpt2", FIXTURES / "peft_llama", "-o", tmp_path / "o"])
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "unmatched" in lines[0] and "model.layers.0.self_attn" in lines[0]
    assert "Hint:" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_allow_unmatched_merges_the_rest(tmp_path):
    # drop one base tensor so exactly one module is unmatched
    base = load_file(str(FIXTURES / "base_gpt2" / "model.safetensors"))
    del base["transformer.h.1.mlp.c_fc.weight"]
    (tmp_path / "b").mkdir()
    save_file(base, str(tmp_path / "b" / "model.safetensors"))
    with pytest.raises(loratool.IncompatibleError, match=r"transformer\.h\.1\.mlp\.c_fc"):
        merge(tmp_path / "b", [FIXTURES / "peft_gpt2"], tmp_path / "o")
    report = merge(tmp_path / "b", [FIXTURES / "peft_gpt2"], tmp_path / "o", allow_unmatched=True)
    assert report.unmatched == ["transformer.h.1.mlp.c_fc"]
    assert report.warnings and "transformer.h.1.mlp.c_fc" in report.warnings[0]


def test_shape_mismatch_is_an_error(tmp_path):
    base = load_file(str(FIXTURES / "base_gpt2" / "model.safetensors"))
    base["transformer.h.0.attn.c_attn.weight"] = torch.zeros(8, 8)
    (tmp_path / "b").mkdir()
    save_file(base, str(tmp_path / "b" / "model.safetensors"))
    with pytest.raises(loratool.IncompatibleError, match=r"needs a base weight of shape \(32, 96\)"):
        merge(tmp_path / "b", [FIXTURES / "peft_gpt2"], tmp_path / "o")


def test_non_finite_result_names_the_tensor(tmp_path, capsys):
    d = tmp_path / "nan"
    d.mkdir()
    sd = load_file(str(FIXTURES / "peft_gpt2" / "adapter_model.safetensors"))
    key = next(k for k in sd if k.endswith("lora_B.weight"))
    sd[key][0, 0] = float("inf")
    save_file(sd, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_bytes((FIXTURES / "peft_gpt2" / "adapter_config.json").read_bytes())
    code, _, err = run_cli(["merge", FIXTURES / "base_gpt2", d, "-o", tmp_path / "o"])
    assert code == 2
    module = key[len("base_model.model.") : -len(".lora_B.weight")]
    assert f"'{module}.weight'" in err and "NaN/Inf" in err
    assert not (tmp_path / "o").exists()


def test_dtype_option_and_report_file(tmp_path, capsys):
    code, out, _ = run_cli([
            "merge",
            FIXTURES / "base_gpt2",
            FIXTURES / "peft_gpt2",
            "-o",
            tmp_path / "o",
            "--dtype",
            "bf16",
            "--report",
            tmp_path / "r.json",
        ],
    )
    assert code == 0
    assert out.strip().splitlines()[-1].startswith(f"Wrote {tmp_path / 'o'} (")
    merged = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in merged.values() if v.is_floating_point())
    report = json.loads((tmp_path / "r.json").read_text())
    stats = {t["key"]: t for t in report["tensors"]}
    base = load_file(str(FIXTURES / "base_gpt2" / "model.safetensors"))
    fp32 = merge(FIXTURES / "base_gpt2", [FIXTURES / "peft_gpt2"], tmp_path / "f32", stats=True)
    exact = load_file(str(tmp_path / "f32" / "model.safetensors"))
    for key, t in stats.items():
        new, old = exact[key].double(), base[key].double()
        assert t["rel_change"] == pytest.approx(float((new - old).norm() / old.norm()), rel=1e-4)
        assert t["delta_fro"] == pytest.approx(float((new - old).norm()), rel=1e-4)
        cast = (merged[key].double() - new).abs().max().item()
        assert t["max_cast_error"] == pytest.approx(cast, rel=1e-3, abs=1e-9)
        assert t["max_cast_error"] > 0
    assert fp32.to_dict()["max_cast_error"] == 0


def test_existing_output_refused_and_inputs_untouched(tmp_path, capsys):
    before = {**tree_hash(FIXTURES / "base_llama"), **tree_hash(FIXTURES / "peft_llama")}
    (tmp_path / "o").mkdir()
    code, _, err = run_cli(["merge", FIXTURES / "base_llama", FIXTURES / "peft_llama", "-o", tmp_path / "o"])
    assert code == 2 and "already exists" in err and "--force" in err
    code, _, _ = run_cli(["merge", FIXTURES / "base_llama", FIXTURES / "peft_llama", "-o", tmp_path / "o", "--force"]
    )
    assert code == 0 and (tmp_path / "o" / "model.safetensors.index.json").exists()
    assert {**tree_hash(FIXTURES / "base_llama"), **tree_hash(FIXTURES / "peft_llama")} == before


def test_disk_full_leaves_nothing(tmp_path, monkeypatch, capsys):
    from loratool.io.writers import StreamingWriter

    calls = {"n": 0}
    real = StreamingWriter.copy_range

    def failing(self, key, *args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        return real(self, key, *args)

    monkeypatch.setattr(StreamingWriter, "copy_range", failing)
    code, _, err = run_cli(["merge", FIXTURES / "base_llama", FIXTURES / "peft_llama", "-o", tmp_path / "o"])
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "no space left on device" in lines[0] and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no output, no temporary sibling


def test_file_size_limit_is_a_clean_error(tmp_path):
    """A real OS write failure (RLIMIT_FSIZE -> EFBIG) in a subprocess: one Error line, nothing left."""
    script = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
        "from loratool.cli import main; main(sys.argv[1:])"
    )
    res = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            "merge",
            str(FIXTURES / "base_llama"),
            str(FIXTURES / "peft_llama"),
            "-o",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("Error:") == 1 and "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == []


def _big_base(tmp: Path) -> tuple[Path, Path]:
    """A ~240 MB fp32 base of 60 tensors and a matching kohya adapter, so a merge takes a while."""
    from loratool.io.writers import StreamingWriter

    base = tmp / "big.safetensors"
    n, dim = 60, 1000
    entries = [(f"model.diffusion_model.blocks.{i}.proj.weight", "float32", (dim, dim)) for i in range(n)]
    w = StreamingWriter(base, entries)
    for key, _, shape in entries:
        w.write(key, torch.full(shape, 0.5))
    w.close()
    lora = {}
    for i in range(n):
        lora[f"lora_unet_blocks_{i}_proj.lora_down.weight"] = torch.randn(4, dim)
        lora[f"lora_unet_blocks_{i}_proj.lora_up.weight"] = torch.randn(dim, 4)
    save_file(lora, str(tmp / "lora.safetensors"))
    return base, tmp / "lora.safetensors"


def _stop_mid_write(proc: subprocess.Popen, tmp_dir: Path, out: Path) -> bool:
    """SIGSTOP `proc` while its temporary output is being written; False if it finished first.

    Polling the temporary file's size and then signalling is a race on a fast machine (the whole
    240 MB can be written between two polls), so the process is frozen first and only then is it
    checked that the temporary file is still there and the output not yet renamed into place.
    """
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        for p in tmp_dir.iterdir():
            if p.name.startswith(f".{out.name}.tmp-"):
                try:
                    size = p.stat().st_size
                except FileNotFoundError:  # renamed into place between listing and stat
                    continue
                if size > 1_000_000:
                    os.kill(proc.pid, signal.SIGSTOP)
                    return p.exists() and not out.exists()
        time.sleep(0.002)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_merge_leaves_no_output(tmp_path, sig):
    base, lora = _big_base(tmp_path)
    before = tree_hash(base) | tree_hash(lora)
    out = tmp_path / "out.safetensors"
    for _attempt in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-m", "loratool", "merge", str(base), str(lora), "-o", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        if _stop_mid_write(proc, tmp_path, out):
            break
        proc.kill()
        proc.communicate(timeout=60)
        out.unlink(missing_ok=True)
    else:
        pytest.fail("merge was never caught while writing its temporary output")
    # the process is frozen mid-write: the signal is delivered once it runs again
    proc.send_signal(sig)
    os.kill(proc.pid, signal.SIGCONT)
    _stdout, stderr = proc.communicate(timeout=60)
    assert not out.exists()
    assert tree_hash(base) | tree_hash(lora) == before
    if sig == signal.SIGINT:
        assert proc.returncode == 130, stderr
        assert "Traceback" not in stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([base.name, lora.name])
    else:
        assert proc.returncode == -signal.SIGKILL


def test_peak_memory_is_bounded_by_one_tensor(tmp_path):
    """~240 MB of base through merge: peak RSS stays far below the model size."""
    base, lora = _big_base(tmp_path)
    script = (
        "import resource, sys; from loratool.ops.merge import merge; "
        "merge(sys.argv[1], [sys.argv[2]], sys.argv[3]); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    res = subprocess.run(
        [sys.executable, "-c", script, str(base), str(lora), str(tmp_path / "o.safetensors")],
        capture_output=True,
        text=True,
        check=True,
    )
    peak_mb = int(res.stdout.split()[-1]) / 1024
    baseline = subprocess.run(
        [
            sys.executable,
            "-c",
            "import resource, torch, loratool.ops.merge; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    base_mb = int(baseline.stdout.split()[-1]) / 1024
    assert peak_mb - base_mb < 120, f"merge peak {peak_mb:.0f} MB vs {base_mb:.0f} MB after imports (model 240 MB)"
    from loratool.io.header import read_header

    assert [i.shape for i in read_header(tmp_path / "o.safetensors").tensors.values()] == [
        i.shape for i in read_header(base).tensors.values()
    ]


def test_existing_report_file_is_refused_before_merging(tmp_path, capsys):
    (tmp_path / "r.json").write_text("keep me")
    args = ["merge", FIXTURES / "base_gpt2", FIXTURES / "peft_gpt2", "-o", tmp_path / "o"]
    args += ["--report", tmp_path / "r.json"]
    code, _, err = run_cli(args)
    assert code == 2 and "r.json" in err and "--force" in err
    assert not (tmp_path / "o").exists() and (tmp_path / "r.json").read_text() == "keep me"
    code, _, _ = run_cli([*args, "--force"])
    assert code == 0 and json.loads((tmp_path / "r.json").read_text())["tensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("weights", ["nan", "1,x", "inf", ""])
def test_bad_weights_are_refused_before_any_work(tmp_path, capsys, weights):
    args = ["merge", FIXTURES / "base_gpt2", FIXTURES / "peft_gpt2", "-o", tmp_path / "o", "--weights", weights]
    code, _, err = run_cli(args)
    assert code == 2 and err.startswith("Error: --weights") and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_background_sha256_follows_the_caller_and_stops(tmp_path):
    from loratool.io.copies import BackgroundSha256

    rng = np.random.default_rng(0)
    paths = []
    for i, size in enumerate([3 << 20, 0, 9 << 20 | 123]):
        p = tmp_path / f"f{i}"
        p.write_bytes(rng.bytes(size))
        paths.append(p)
    h = BackgroundSha256(paths, lead=1 << 20)
    assert not h.digests[0].done()  # held back: at most 1 MiB ahead of a merge that has not started
    h.advance(1 << 40)
    assert [d.result(timeout=30) for d in h.digests] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    held = BackgroundSha256(paths, lead=0)
    held.stop()
    held._thread.join(timeout=10)
    assert not held._thread.is_alive() and not any(d.done() for d in held.digests)
