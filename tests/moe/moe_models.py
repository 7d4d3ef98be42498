"""Tiny MoE models built from configs, and adapters made by peft itself, for tests/moe/."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ATTN = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            vocab_size=64)
# name -> (config class name, config keywords); hidden 32 and intermediate 16: no expert weight is square
# except gpt-oss's gate_up_proj (E, 32, 32), whose orientation then comes from config.json
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=64, moe_intermediate_size=16, num_experts=4,
                                         num_experts_per_tok=2, **ATTN)),
    "gpt_oss": ("GptOssConfig", dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                                     layer_types=["sliding_attention", "full_attention"], **ATTN)),
    "mixtral": ("MixtralConfig", dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, **ATTN)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=64, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                                         **ATTN)),
}
PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def make_base(name: str, out: Path, seed: int = 0) -> Any:
    """A tiny random model of `name` saved (float32) to `out`; returns the model."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cls, kw = MODELS[name]
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**kw))
    with torch.no_grad():  # experts start at zeros in some inits: make every weight matter
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(out)
    return model


def make_adapter(base: Path, out: Path, *, r: int = 4, alpha: float = 8, seed: int = 1,
                 target_modules: list[str] | None = None, target_parameters: list[str] | None = None,
                 **extra: Any) -> None:
    """A peft adapter with random (non-zero) factors on the model at `base`, saved to `out`."""
    import peft
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules or ["q_proj"],
                          target_parameters=PARAMS if target_parameters is None else target_parameters,
                          init_lora_weights=False, **extra)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    pm.save_pretrained(out)


def peft_model(base: Path, adapter: Path) -> Any:
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    return peft.PeftModel.from_pretrained(model, adapter).eval()


def expert_wrappers(pm: Any) -> dict[str, Any]:
    """peft's ParamWrappers by the fused parameter's path (`model.layers.0.mlp.experts.gate_up_proj`)."""
    from peft.tuners.lora.layer import ParamWrapper

    out = {}
    for name, mod in pm.base_model.model.named_modules():
        if isinstance(mod, ParamWrapper):
            module = name.replace(".base_layer", "")
            out[f"{module}.{mod.parameter_name}"] = mod
    return out


def per_expert_model(checkpoint: Path) -> Any:
    """A torch model holding a Mixtral checkpoint's experts as it stores them on disk, one Linear per
    expert (`model.layers.{i}.block_sparse_moe.experts.{e}.w1/w2/w3`), as transformers 4 built them:
    what per-expert `target_modules` adapters were trained on. Weights loaded from `checkpoint`."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(checkpoint / "model.safetensors")
    root = torch.nn.Module()
    for key, t in tensors.items():
        if ".experts." not in key:
            continue
        *path, last, _ = key.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, torch.nn.Module())
            node = getattr(node, part)
        linear = torch.nn.Linear(t.shape[1], t.shape[0], bias=False)
        with torch.no_grad():
            linear.weight.copy_(t)
        node.add_module(last, linear)
    return root
