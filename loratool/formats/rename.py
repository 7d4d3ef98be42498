"""Module names from one format's naming to another's (convert, combine, extract use this).

The prefix tables live in names.py; kohya stems and their recovery in kohya.py; placement under a
diffusers component in diffusers.py. What each format's naming is comes from its registry record.
"""

from __future__ import annotations

from loratool.adapter import Adapter
from loratool.formats import diffusers, kohya
from loratool.formats.diffusers import FOREIGN
from loratool.formats.names import split_component
from loratool.formats.registry import get

__all__ = ["FOREIGN", "NO_RULE", "stored_name", "target_names"]


def stored_name(fmt: str, name: str) -> str:
    """The name a module called `name` is stored under in format `fmt` (kohya: its stem)."""
    return kohya.kohya_name(name) if get(fmt).naming == "stem" else name


NO_RULE = "the kohya naming rules allow no single reading"


def target_names(
    adapter: Adapter, to: str, matched: dict[str, str] | None, base_class: str | None, warnings: list[str],
    *, sd1: bool | None = None,
) -> tuple[dict[str, tuple[str, str]], dict[str, list[str]]]:
    """The names an adapter's modules get in the format `to` (see ops/convert.py for the layouts).

    Args:
        matched: module name -> the base key it matched (with a base), else None.
        base_class: the base's diffusers `_class_name` (settles U-Net vs transformer), if any.
        sd1: whether the pipeline has SD1.x/2.x's one text encoder (kohya `lora_te_`); None: told by
            the module names (kohya.is_sd1_unet).
        warnings: where to append what the caller should tell the user.

    Returns:
        Module name -> (new name, placed_by: "base", "metadata" (the path a kohya file recorded),
        "rules" or "name"), and the names that
        cannot be placed, by reason (FOREIGN in a reason: a layout diffusers names differently).
    """
    source, target = get(adapter.source_format).naming, get(to).naming
    names: dict[str, tuple[str, str]] = {}
    unplaced: dict[str, list[str]] = {}
    hint_class = diffusers.component_of_class(base_class)
    recorded = kohya.module_paths(adapter.metadata) if source == "stem" else {}
    if sd1 is None:
        sd1 = kohya.is_sd1_unet(adapter.modules)
    for name in adapter.modules:
        base_key = matched.get(name) if matched is not None else None
        if target == "stem":
            names[name] = (kohya.kohya_name(name, sd1=sd1), "name")
            continue
        component: str | None = None
        if source == "stem":  # the names lost their dots: recover them
            placed = kohya.place(name, base_key, recorded)
            if placed is None:
                unplaced.setdefault(NO_RULE, []).append(name)
                continue
            path, by, component = placed.path, placed.by, placed.component
        elif base_key is not None:
            path, by = base_key.removesuffix(".weight"), "base"
        else:
            path, by = name, "name"
        if target == "path":
            names[name] = (path, by)  # components are settled below, over the whole adapter
            if by == "rules":
                names[name] = (f"{component}.{path}", by)
            continue
        # under a component
        if source == "component" and base_key is None:
            names[name] = (name, "name")
            continue
        # the base's class settles U-Net vs transformer; a kohya text-encoder prefix stays what it says
        hint = hint_class if component in (None, "unet", "transformer") and hint_class else component
        where = diffusers.place(path, hint)
        if isinstance(where, str):
            unplaced.setdefault(where, []).append(name)
        else:
            names[name] = (f"{where[0]}.{where[1]}", by)
    if target == "path":
        _settle_components(names, adapter, warnings)
    return names, unplaced


def _settle_components(names: dict[str, tuple[str, str]], adapter: Adapter, warnings: list[str]) -> None:
    """PEFT wraps one model: drop the diffusers component from the names when only one occurs."""
    loose = {n: v for n, v in names.items()
             if v[1] == "rules" or (v[1] == "name" and get(adapter.source_format).naming == "component")}
    if not loose:
        return
    components = {parts[0] for new, _ in loose.values() if (parts := split_component(new))}
    if len(components) == 1:
        for n, (new, by) in loose.items():
            parts = split_component(new)
            if parts:
                names[n] = (parts[1], by)
    elif len(components) > 1:
        warnings.append(
            f"the adapter spans {len(components)} components ({', '.join(sorted(components))}); the PEFT module "
            "names keep them as a prefix (unet., text_encoder., ...), so peft loads it only into a model holding "
            "those components as attributes. Pass --base to name modules by the base checkpoint's keys"
        )
