"""LoRA variants whose factors mean something else than "add s·B·A to the base you have".

- PiSSA, OLoRA, CorDA (PEFT `init_lora_weights` "pissa[_niter_N]", "olora", "corda"): the adapter's
  initial factors B0, A0 were cut out of the base, so it was trained on the residual base
  W_res = W − s·B0·A0. Saved without PEFT's conversion, s·B·A is the whole adapted weight's low-rank
  part, not a delta for W. PEFT's own conversion (save_pretrained's
  path_initial_model_for_weight_conversion) writes ΔW = s·(B·A − B0·A0) as the rank-2r LoRA
  [B | −B0] · [A ; A0]; `convert_with_initial` does the same from the initial adapter's files.
- LoftQ (`init_lora_weights` "loftq"): trained on LoftQ's quantized-then-corrected base, not on W.
- aLoRA (`alora_invocation_tokens`): the delta applies only to tokens after the invocation sequence;
  merged into the weights it applies to every token.

An adapter saved after PEFT's conversion has `init_lora_weights` true (PEFT sets it), so the config
value alone tells an unconverted one. `detect` names them (inspect, validate); `guard` refuses them
in merge, combine, resize and convert unless the caller allows them (then a warning says what the
result means).
"""

from __future__ import annotations

from dataclasses import dataclass

from loratool.adapter import Adapter, LoraModule
from loratool.errors import IncompatibleError


@dataclass(frozen=True)
class Variant:
    """One variant found in an adapter's config.

    Attributes:
        name: "PiSSA", "OLoRA", "CorDA", "LoftQ" or "aLoRA".
        setting: the config setting that says so, as found (`init_lora_weights = 'pissa'`).
        trained_on: what the factors assume, in words.
        convertible: PEFT's conversion with the initial adapter applies (PiSSA, OLoRA, CorDA).
    """

    name: str
    setting: str
    trained_on: str
    convertible: bool

    def hint(self, path: object, op: str) -> str:
        if self.convertible:
            return (f"convert it to plain LoRA first: loratool convert {path} --initial-adapter INIT --to peft -o "
                    "PLAIN (INIT: the adapter PEFT saved right after initialisation; peft itself: "
                    "model.save_pretrained(OUT, path_initial_model_for_weight_conversion=INIT)), or add "
                    f"--allow-variant to {op} it as it is")
        if self.name == "LoftQ":
            return f"add --allow-variant to {op} it as it is (right only on the LoftQ base it was trained with)"
        return f"add --allow-variant to {op} it as it is (the result applies the delta to every token)"

    def meaning(self, op: str) -> str:
        if self.name == "aLoRA":
            return (f"the {op} result applies the adapter to every token, not only after its invocation tokens "
                    "(an aLoRA served as itself waits for them)")
        return f"the {op} result is right only on {self.trained_on}, not on the original base model"


_INITS = {
    "pissa": ("PiSSA", True),
    "olora": ("OLoRA", True),
    "corda": ("CorDA", True),
    "loftq": ("LoftQ", False),
}


def detect(adapter: Adapter) -> list[Variant]:
    """The variants `adapter`'s config declares (PEFT keys: init_lora_weights, alora_invocation_tokens)."""
    cfg = adapter.config
    found: list[Variant] = []
    init = cfg.get("init_lora_weights")
    if isinstance(init, str):
        key = next((k for k in _INITS if init.lower().startswith(k)), None)
        if key is not None:
            name, convertible = _INITS[key]
            trained_on = ("LoftQ's quantized-then-corrected base" if key == "loftq" else
                          "the residual base W - s·B0·A0 it was trained on (its initial factors removed)")
            found.append(Variant(name, f"init_lora_weights = {init!r}", trained_on, convertible))
    tokens = cfg.get("alora_invocation_tokens")
    if tokens:
        found.append(Variant("aLoRA", f"alora_invocation_tokens = {tokens!r}", "", False))
    return found


def guard(adapter: Adapter, op: str, allow: bool) -> list[str]:
    """Refuse a variant adapter for `op`, or with `allow` return the warnings that say what the result means.

    Raises:
        IncompatibleError: a variant (named, with its setting) and allow is False.
    """
    out = []
    for v in detect(adapter):
        if not allow:
            raise IncompatibleError(
                f"{adapter.path}: a {v.name} adapter ({v.setting}), saved without conversion: "
                f"{v.meaning(op)}", hint=v.hint(adapter.path, op))
        out.append(f"{adapter.path}: {v.name} adapter ({v.setting}) used with --allow-variant: {v.meaning(op)}")
    return out


def convert_with_initial(adapter: Adapter, initial: Adapter) -> Adapter:
    """PEFT's conversion of an unconverted PiSSA / OLoRA / CorDA adapter to plain LoRA.

    ΔW = s·B·A − s0·B0·A0 as the rank-2r pair up' = [B | −(s0/s)·B0], down' = [A ; A0] at the
    module's scale s (alpha doubled, or times sqrt(2) with rsLoRA, as PEFT writes it), in float32
    and cast back to the stored dtype. The config's init_lora_weights becomes true.

    Raises:
        IncompatibleError: an adapter that is not such a variant, or an initial adapter that does not
            match it module for module (names, ranks, shapes).
    """
    import torch

    from loratool.io.tensors import TensorRef

    kinds = [v for v in detect(adapter) if v.convertible]
    if not kinds:
        raise IncompatibleError(f"{adapter.path}: --initial-adapter applies to PiSSA / OLoRA / CorDA adapters "
                                "saved without conversion (init_lora_weights 'pissa...', 'olora' or 'corda'); "
                                f"this one has init_lora_weights = {adapter.config.get('init_lora_weights')!r}")
    missing = [n for n in adapter.modules if n not in initial.modules]
    if missing:
        raise IncompatibleError(f"{initial.path}: the initial adapter has no module '{missing[0]}' "
                                f"({len(missing)} of {len(adapter.modules)} missing)",
                                hint="pass the adapter PEFT saved right after initialising this one")
    modules: dict[str, LoraModule] = {}
    for name, m in adapter.modules.items():
        m0 = initial.modules[name]
        if m.magnitude is not None or m0.magnitude is not None:
            raise IncompatibleError(f"{adapter.path}: module '{name}' is DoRA; --initial-adapter converts plain "
                                    "LoRA factors only")
        if (m0.rank, m0.up.shape, m0.down.shape, m0.kind) != (m.rank, m.up.shape, m.down.shape, m.kind):
            raise IncompatibleError(f"{initial.path}: module '{name}' has shapes {m0.up.shape} / {m0.down.shape}, "
                                    f"the adapter {m.up.shape} / {m.down.shape}",
                                    hint="pass the adapter PEFT saved right after initialising this one")
        up, down = m.up.load(), m.down.load()
        up0 = m0.up.load().to(torch.float32) * (-(m0.scale / m.scale) if m.scale else 0.0)
        new_up = torch.cat([up.to(torch.float32), up0], dim=1).to(up.dtype).contiguous()
        new_down = torch.cat([down, m0.down.load().to(down.dtype)], dim=0).contiguous()
        alpha = m.alpha * (2 ** 0.5 if m.rslora else 2.0)
        modules[name] = m.with_(up=TensorRef.from_tensor(new_up), down=TensorRef.from_tensor(new_down), alpha=alpha,
                                alpha_source="config")
    config = dict(adapter.config)
    config["init_lora_weights"] = True
    return adapter.with_modules(modules, config=config)
