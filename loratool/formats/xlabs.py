"""XLabs (x-flux) FLUX.1 LoRA files: read, as the exact diffusers-side modules they amount to.

XLabs' trainer wraps FLUX.1's attention in LoRA processors and saves their layers:

    double_blocks.N.processor.qkv_lora1.down/up.weight   image stream qkv    (out 3h)
    double_blocks.N.processor.qkv_lora2.down/up.weight   text stream qkv     (out 3h)
    double_blocks.N.processor.proj_lora1.down/up.weight  image attn proj
    double_blocks.N.processor.proj_lora2.down/up.weight  text attn proj
    single_blocks.N.processor.qkv_lora.down/up.weight    the q, k, v rows of linear1 (not its MLP rows)
    single_blocks.N.processor.proj_lora.down/up.weight   linear2 (same input: attention output + MLP)

(sometimes under `diffusion_model.`). Each is added to the output of the layer it names, with the
same input, so each is a weight delta up @ down; the processors scale it by network_alpha / rank
only when an alpha is given, and the files hold none: the scale is 1 (alpha = rank). A qkv layer
shares one down among q, k and v, so it is read as three diffusers modules (`attn.to_q`, `to_k`,
`to_v`; `add_q_proj`, ... for the text stream) with that down and up's row thirds: exact, and
`convert --to kohya` fuses them back bit for bit. loratool reads this layout; it writes diffusers
(the record's write_as) or whatever --format / --to names.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any

from loratool.adapter import Adapter, LoraModule
from loratool.errors import FormatError
from loratool.formats._common import Findings
from loratool.formats.registry import Capabilities, Format
from loratool.formats.tensorfile import TensorFile
from loratool.io.tensors import TensorRef

KEY = re.compile(r"^(?:diffusion_model\.)?(double|single)_blocks\.(\d+)\.processor\."
                 r"(qkv_lora1|qkv_lora2|proj_lora1|proj_lora2|qkv_lora|proj_lora)\.(down|up)\.weight$")

# (block kind, processor layer) -> the diffusers modules holding its rows, in row order
_TARGETS: dict[tuple[str, str], tuple[str, ...]] = {
    ("double", "qkv_lora1"): ("attn.to_q", "attn.to_k", "attn.to_v"),
    ("double", "qkv_lora2"): ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    ("double", "proj_lora1"): ("attn.to_out.0",),
    ("double", "proj_lora2"): ("attn.to_add_out",),
    ("single", "qkv_lora"): ("attn.to_q", "attn.to_k", "attn.to_v"),
    ("single", "proj_lora"): ("proj_out",),
}
_BLOCKS = {"double": "transformer.transformer_blocks", "single": "transformer.single_transformer_blocks"}


def detect(keys: list[str]) -> int:
    """3 when every tensor is an XLabs processor LoRA layer (above diffusers' and kohya's scores)."""
    return 3 if keys and all(KEY.match(k) for k in keys) else 0


def _rows(up: TensorRef, start: int, stop: int) -> Any:
    return up.load()[start:stop]


def from_tensors(tf: TensorFile, findings: Findings) -> Adapter:
    groups: dict[tuple[str, int, str], dict[str, tuple[str, TensorRef]]] = {}
    for key, ref in tf.tensors.items():
        m = KEY.match(key)
        if m is None:  # detect() let only XLabs keys through
            raise FormatError(f"{tf.path}: '{key}' is not an XLabs processor LoRA tensor")
        kind, index, layer, role = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        if (kind, layer) not in _TARGETS:
            raise FormatError(f"{tf.path}: '{key}': a {kind} block has no processor layer '{layer}'",
                              hint="XLabs double blocks have qkv_lora1/2 and proj_lora1/2, single blocks "
                                   "qkv_lora and proj_lora")
        group = groups.setdefault((kind, index, layer), {})
        if role in group:
            raise FormatError(f"{tf.path}: '{key}' and '{group[role][0]}' are the same tensor of one layer")
        group[role] = (key, ref)
    modules: dict[str, LoraModule] = {}
    for (kind, index, layer), group in sorted(groups.items(), key=lambda g: (g[0][0] != "double", g[0][1], g[0][2])):
        if "down" not in group or "up" not in group:
            have, lacks = ("up", "down") if "up" in group else ("down", "up")
            findings.error(f"missing-{lacks}", None,
                           f"{tf.path}: '{group[have][0]}' has no matching .{lacks}.weight tensor", exc=FormatError)
            continue
        (dkey, down), (ukey, up) = group["down"], group["up"]
        if len(down.shape) != 2 or len(up.shape) != 2 or up.shape[1] != down.shape[0]:
            findings.error("rank-mismatch", None, f"{tf.path}: '{dkey}' is {down.shape} but '{ukey}' is {up.shape}; "
                           "expected (r, in) and (out, r)", exc=FormatError)
            continue
        targets = _TARGETS[(kind, layer)]
        if up.shape[0] % len(targets):
            findings.error("bad-shape", None, f"{tf.path}: '{ukey}' has {up.shape[0]} rows, not {len(targets)} "
                           "equal parts (q, k, v)", exc=FormatError)
            continue
        part = up.shape[0] // len(targets)
        rank = down.shape[0]
        for j, target in enumerate(targets):
            name = f"{_BLOCKS[kind]}.{index}.{target}"
            piece = up if len(targets) == 1 else TensorRef.computed(
                (part, rank), up.dtype, partial(_rows, up, j * part, (j + 1) * part),
                f"{tf.path}: '{ukey}' rows {j * part}:{(j + 1) * part}")
            modules[name] = LoraModule(name, down, piece, alpha=float(rank), alpha_source="implied")
    return Adapter(modules=modules, source_format="xlabs", metadata=tf.metadata, path=tf.path, files=[tf.path],
                   family="flux.1")


FORMAT = Format(
    name="xlabs",
    summary="XLabs (x-flux) FLUX.1 LoRA .safetensors (double_blocks.N.processor.qkv_lora1.down.weight); read only",
    naming="component",
    capabilities=Capabilities(),
    detect=detect,
    read_file=from_tensors,
    write_as="diffusers",
)
