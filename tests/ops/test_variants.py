"""LoRA variants (loratool.variants): unconverted PiSSA / OLoRA adapters made by real peft, LoftQ and aLoRA
configs; named by inspect and validate, refused by merge, combine, resize and convert unless
--allow-variant, and converted with the initial adapter exactly as peft's own
save_pretrained(path_initial_model_for_weight_conversion=...) does.

The references are peft itself: its converted adapter, and the trained PeftModel's merged weights
(merge_and_unload of W_res + s·B·A), which the original base plus the converted adapter must equal.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from clirun import run_cli
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).float()


@pytest.fixture(scope="module", params=["pissa", "olora"])
def variant(request, tmp_path_factory):
    """(base dir, initial adapter, trained unconverted adapter, peft's converted adapter, merged weights)."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp(request.param)
    model = _llama()
    model.save_pretrained(root / "base")  # the original base W
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=request.param,
                     rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 4})
    peft_model = get_peft_model(model, cfg)  # modifies the base: W_res = W - s·B0·A0
    peft_model.save_pretrained(root / "initial")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # "training"
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(root / "trained")  # unconverted: init_lora_weights stays the variant
    merged = {k: v.clone() for k, v in peft_model.merge_and_unload().state_dict().items()}
    return request.param, root, merged


def _converted_by_peft(root: Path, kind: str) -> Path:
    """peft's own conversion, on a fresh PeftModel loaded from the trained files."""
    from peft import PeftModel

    out = root / "peft_converted"
    if out.exists():
        return out
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(root / "base")
    pm = PeftModel.from_pretrained(model, root / "trained")
    pm.save_pretrained(out, path_initial_model_for_weight_conversion=str(root / "initial"))
    return out


def _deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """ΔW per module from a PEFT directory, with peft's own pattern rule."""
    from peft.utils.other import get_pattern_key

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    t = load_file(str(adapter_dir / "adapter_model.safetensors"))
    rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    out = {}
    for key, a in t.items():
        if key.endswith(".lora_A.weight"):
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            r = rp.get(get_pattern_key(list(rp), name), cfg["r"])
            alpha = ap.get(get_pattern_key(list(ap), name), cfg["lora_alpha"])
            assert a.shape[0] == r
            s = alpha / r ** 0.5 if cfg.get("use_rslora") else alpha / r
            out[name] = s * (t[key.replace("lora_A", "lora_B")].double() @ a.double())
    return out


def test_inspect_and_validate_name_the_variant(variant):
    kind, root, _ = variant
    code, out, _ = run_cli(["inspect", root / "trained", "--json"])
    assert code == 0
    names = [v["name"] for v in json.loads(out)["variants"]]
    assert names == [{"pissa": "PiSSA", "olora": "OLoRA"}[kind]]
    code, out, _ = run_cli(["validate", root / "trained", "--json"])
    doc = json.loads(out)
    flagged = [f for f in doc["findings"] if f["code"] == "lora-variant"]
    assert code == 0 and len(flagged) == 1 and "--initial-adapter" in flagged[0]["message"]
    assert run_cli(["validate", root / "trained", "--strict"])[0] == 1
    code, out, _ = run_cli(["validate", root / "trained", "--for", "vllm", "--json"])
    assert code == 1 and any("init_lora_weights" in f["message"] and "PiSSA, OLoRA, CorDA" in f["message"]
                             for f in json.loads(out)["findings"] if f["severity"] == "error")


def test_merge_combine_resize_convert_refuse_unless_allowed(variant, tmp_path):
    kind, root, _ = variant
    trained = root / "trained"
    name = {"pissa": "PiSSA", "olora": "OLoRA"}[kind]
    attempts = {
        "merge": ["merge", root / "base", trained, "-o", tmp_path / "m"],
        "combine": ["combine", trained, trained, "-o", tmp_path / "c"],
        "resize": ["resize", trained, "--rank", "2", "-o", tmp_path / "r"],
        "convert": ["convert", trained, "--to", "kohya", "-o", tmp_path / "k.safetensors"],
    }
    for op, args in attempts.items():
        code, _, err = run_cli(args)
        err = " ".join(err.split())
        assert code == 2, (op, err)
        assert err.startswith(f"Error: {trained}: a {name} adapter (init_lora_weights = '{kind}')"), err
        assert "Hint:" in err and "--initial-adapter" in err and "--allow-variant" in err
        assert not Path(args[-1]).exists()
    code, _, err = run_cli([*attempts["merge"], "--allow-variant"])
    assert code == 0, err
    err = " ".join(err.split())  # stderr is wrapped
    assert "used with --allow-variant" in err and "right only on the residual base" in err


def test_initial_adapter_conversion_equals_peft_and_merges_to_the_trained_model(variant, tmp_path):
    kind, root, merged = variant
    ours = tmp_path / "plain"
    code, _, err = run_cli(["convert", root / "trained", "--initial-adapter", root / "initial", "--to", "peft",
                            "-o", ours])
    assert code == 0, err
    cfg = json.loads((ours / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True
    want, got = _deltas(_converted_by_peft(root, kind)), _deltas(ours)
    assert set(got) == set(want) and len(got) == 2 * len(TARGETS)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6)
    # the original base plus the converted adapter is the model peft trained (W_res + s·B·A)
    code, _, err = run_cli(["merge", root / "base", ours, "-o", tmp_path / "merged"])
    assert code == 0, err
    mine = load_file(str(tmp_path / "merged" / "model.safetensors"))
    for key, w in merged.items():
        if any(t in key for t in TARGETS):
            torch.testing.assert_close(mine[key], w, rtol=1e-5, atol=2e-6)
    # and it is no longer a variant: vLLM takes it
    assert run_cli(["validate", ours, "--for", "vllm"])[0] == 0


def test_convert_for_vllm_with_the_initial_adapter(variant, tmp_path):
    _, root, _ = variant
    code, _, err = run_cli(["convert", root / "trained", "--for", "vllm", "-o", tmp_path / "x"])
    err = " ".join(err.split())
    assert code == 2 and "init_lora_weights" in err and "--initial-adapter" in err
    code, _, err = run_cli(["convert", root / "trained", "--for", "vllm", "--initial-adapter", root / "initial",
                            "-o", tmp_path / "y"])
    assert code == 0, err
    assert run_cli(["validate", tmp_path / "y", "--for", "vllm"])[0] == 0


@pytest.mark.parametrize("config,name", [({"init_lora_weights": "loftq"}, "LoftQ"),
                                         ({"alora_invocation_tokens": [3, 4]}, "aLoRA")])
def test_loftq_and_alora_are_named_and_refused(make_adapter, make_base, tmp_path, config, name):
    mod = "model.layers.0.self_attn.q_proj"
    src = make_adapter(modules={mod: (16, 16)}, rank=4, config=config)
    base = make_base({mod + ".weight": (16, 16)})
    code, out, _ = run_cli(["validate", src, "--json"])
    assert code == 0 and any(f["code"] == "lora-variant" and name in f["message"]
                             for f in json.loads(out)["findings"])
    code, _, err = run_cli(["merge", base, src, "-o", tmp_path / "m"])
    err = " ".join(err.split())
    assert code == 2 and f"a {name} adapter" in err and "--allow-variant" in err and "--initial-adapter" not in err
    code, _, err = run_cli(["merge", base, src, "-o", tmp_path / "m2", "--allow-variant"])
    assert code == 0 and "used with --allow-variant" in " ".join(err.split())
    code, _, err = run_cli(["convert", src, "--to", "peft", "--initial-adapter", src, "-o", tmp_path / "c"])
    err = " ".join(err.split())
    assert code == 2 and "--initial-adapter applies to PiSSA / OLoRA / CorDA" in err
