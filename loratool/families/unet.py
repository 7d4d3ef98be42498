"""The Stable Diffusion U-Net (SD1.x / SD2.x, SDXL): diffusers' block indices against the original
(CompVis LDM / Stability SGM) ones, and the relations of a U-Net of a given block structure.

The original U-Net numbers its blocks flat: `input_blocks.N` (N = 0 is `conv_in`), `middle_block.0/1/2`,
`output_blocks.N`, each holding a resnet (`.0`) and, where the level has attention, a spatial
transformer (`.1`) or a sampler. diffusers groups them by level, `layers_per_block` (2 in every SD
U-Net) resnets per down level and one more per up level. Facts from diffusers
`loaders/single_file_utils.py` (`convert_ldm_unet_checkpoint`, `update_unet_resnet_ldm_to_diffusers`,
`DIFFUSERS_TO_LDM_MAPPING`), `loaders/lora_conversion_utils.py` (`_maybe_map_sgm_blocks_to_diffusers`),
ComfyUI `comfy/utils.py` (`unet_to_diffusers`) and kohya sd-scripts `library/sdxl_original_unet.py`:

    down_blocks.i.resnets.j / attentions.j     input_blocks.(3i+j+1).0 / .1
    down_blocks.i.downsamplers.0.conv          input_blocks.(3i+3).0.op
    mid_block.resnets.0 / attentions.0 / resnets.1    middle_block.0 / 1 / 2
    up_blocks.i.resnets.j / attentions.j       output_blocks.(3i+j).0 / .1
    up_blocks.i.upsamplers.0.conv              output_blocks.(3i+2).1.conv (.2.conv after an attention)
    resnet norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut
                                               in_layers.0, in_layers.2, emb_layers.1, out_layers.0,
                                               out_layers.3, skip_connection
    conv_in, time_embedding.linear_1/2, add_embedding.linear_1/2 (SDXL), conv_norm_out, conv_out
                                               input_blocks.0.0, time_embed.0/2, label_emb.0.0/0.2,
                                               out.0, out.2

Inside a spatial transformer the paths are the same on both sides (`norm`, `proj_in`,
`transformer_blocks.t.attn1.to_q`, `ff.net.0.proj`, `proj_out`, ...). formats/blocks.py reads the
LoRA Block Weight ids (INnn / OUTnn) from these same functions.
"""

from __future__ import annotations

from dataclasses import dataclass

from loratool.families.model import Relation, one

LAYERS_PER_BLOCK = 2  # resnets per down level in every SD U-Net (up levels have one more)


def input_block(level: int, j: int) -> int:
    """The original `input_blocks` index of diffusers' `down_blocks.level.{resnets,attentions}.j`."""
    return (LAYERS_PER_BLOCK + 1) * level + j + 1


def downsampler_block(level: int) -> int:
    """The original `input_blocks` index of `down_blocks.level.downsamplers.0`."""
    return (LAYERS_PER_BLOCK + 1) * level + LAYERS_PER_BLOCK + 1


def output_block(level: int, j: int) -> int:
    """The original `output_blocks` index of `up_blocks.level.{resnets,attentions}.j` (and, for j = 2,
    of the level's upsampler)."""
    return (LAYERS_PER_BLOCK + 1) * level + j


def upsampler_block(level: int) -> int:
    """The original `output_blocks` index of `up_blocks.level.upsamplers.0`."""
    return output_block(level, LAYERS_PER_BLOCK)


# resnet: diffusers name -> original name (inside `down_blocks.i.resnets.j` / `input_blocks.N.0`)
RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
          ("norm2", "out_layers.0"), ("conv2", "out_layers.3"))
SHORTCUT = ("conv_shortcut", "skip_connection")
# one transformer block of a spatial transformer (same paths on both sides)
TRANSFORMER_BLOCK = ("norm1", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "norm2", "attn2.to_q",
                     "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "norm3", "ff.net.0.proj", "ff.net.2")


@dataclass(frozen=True)
class UNet:
    """A U-Net's block structure, per down level (top first): its channels, whether it has attention,
    and its transformer depth (`transformer_layers_per_block`; the middle block has the deepest
    level's, attention or not). The up levels mirror the down levels."""

    channels: tuple[int, ...]
    attention: tuple[bool, ...]
    depth: tuple[int, ...]
    add_embedding: bool = False  # SDXL's pooled-text / size conditioning MLP (label_emb)

    def relations(self) -> tuple[Relation, ...]:
        rels: list[Relation] = [one("input_blocks.0.0", "conv_in"), one("time_embed.0", "time_embedding.linear_1"),
                                one("time_embed.2", "time_embedding.linear_2")]
        if self.add_embedding:
            rels += [one("label_emb.0.0", "add_embedding.linear_1"), one("label_emb.0.2", "add_embedding.linear_2")]
        levels = len(self.channels)
        for i in range(levels):
            for j in range(LAYERS_PER_BLOCK):
                n = input_block(i, j)
                shortcut = j == 0 and i > 0 and self.channels[i - 1] != self.channels[i]
                rels += _resnet(f"input_blocks.{n}.0", f"down_blocks.{i}.resnets.{j}", shortcut)
                rels += _attention(f"input_blocks.{n}.1", f"down_blocks.{i}.attentions.{j}",
                                   self.depth[i] if self.attention[i] else 0)
            if i < levels - 1:
                rels.append(one(f"input_blocks.{downsampler_block(i)}.0.op", f"down_blocks.{i}.downsamplers.0.conv"))
        deepest = self.depth[-1]
        rels += _resnet("middle_block.0", "mid_block.resnets.0", False)
        rels += _attention("middle_block.1", "mid_block.attentions.0", deepest)
        rels += _resnet("middle_block.2", "mid_block.resnets.1", False)
        for i in range(levels):
            mirror = levels - 1 - i
            depth = self.depth[mirror] if self.attention[mirror] else 0
            for j in range(LAYERS_PER_BLOCK + 1):
                n = output_block(i, j)
                rels += _resnet(f"output_blocks.{n}.0", f"up_blocks.{i}.resnets.{j}", True)  # skip inputs: always
                rels += _attention(f"output_blocks.{n}.1", f"up_blocks.{i}.attentions.{j}", depth)
            if i < levels - 1:
                at = 2 if depth else 1
                rels.append(one(f"output_blocks.{upsampler_block(i)}.{at}.conv", f"up_blocks.{i}.upsamplers.0.conv"))
        rels += [one("out.0", "conv_norm_out"), one("out.2", "conv_out")]
        return tuple(rels)


def _resnet(original: str, diffusers: str, shortcut: bool) -> list[Relation]:
    pairs = (*RESNET, SHORTCUT) if shortcut else RESNET
    return [one(f"{original}.{o}", f"{diffusers}.{d}") for d, o in pairs]


def _attention(original: str, diffusers: str, depth: int) -> list[Relation]:
    if not depth:
        return []
    paths = ["norm", "proj_in", *(f"transformer_blocks.{t}.{m}" for t in range(depth) for m in TRANSFORMER_BLOCK),
             "proj_out"]
    return [one(f"{original}.{p}", f"{diffusers}.{p}") for p in paths]
