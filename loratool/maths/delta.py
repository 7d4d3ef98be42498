"""What one LoRA module does to its base weight: the factors as 2-D matrices, the dense ΔW in the
base weight's stored layout, and DoRA's normalisation of the merged weight (W + ΔW) by its per-row
or per-column norm. Notation, used by every file of loratool.maths: up (out, r), down (r, in);
ΔW = scale · up @ down. Conv factors are flattened to (out, r) and (r, in·kh·kw); an embedding's ΔW
is (up @ down).T; fan_in_fan_out's ΔW is transposed. Everything is computed in float32 or wider;
callers cast back to the stored dtype. No I/O.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from loratool.adapter import DoraAxis, LoraModule, LycoModule


def factors(
    module: LoraModule, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The module's factors as 2-D matrices: up (out, r) and down (r, in·k), unscaled."""
    import torch

    dtype = dtype or torch.float32
    up = module.up.load().to(device=device, dtype=dtype)
    down = module.down.load().to(device=device, dtype=dtype)
    return up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)  # (out, r), (r, in·k)


def delta(
    module: LoraModule, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """The dense ΔW in the base weight's stored layout (module.base_shape), in float32 by default.

    Dense by nature: use it to merge or to test; never to decompose (see lowrank_svd).
    """
    up, down = factors(module, dtype=dtype, device=device)
    d = (up @ down) * module.scale  # (out, r) @ (r, in·k) -> (out, in·k)
    if module.kind == "embedding" or module.fan_in_fan_out:
        return d.T.contiguous()  # (in, out): embedding (vocab, dim), GPT-2 Conv1D
    return d.reshape(module.base_shape)


def delta_rows(up: torch.Tensor, down: torch.Tensor, scale: float, start: int, stop: int, *, transposed: bool
               ) -> torch.Tensor:
    """Rows start:stop of delta() for a 2-D base weight, from factors() and module.scale: a linear's rows
    of up, or (transposed: an embedding, fan_in_fan_out) columns of down. Each element is the same
    r-term dot product as in delta(), so a tensor merged block by block needs no dense ΔW."""
    if transposed:
        return ((up @ down[:, start:stop]) * scale).T  # (out, r) @ (r, k) -> (out, k), then (k, out)
    return (up[start:stop] @ down) * scale  # (k, r) @ (r, in) -> (k, in)


def dora_eps(module: LoraModule | LycoModule) -> float:
    """What the DoRA weight norm gets added before dividing, as the tools that write the module add it.

    LyCORIS LoHa / LoKr / LoCon (lycoris/functional/general.py `_weight_decompose`) and OneTrainer's
    LoKr add float32's eps (1.19e-7); PEFT (tuners/lora/dora.py), ComfyUI (weight_adapter/base.py
    `weight_decompose`) and OneTrainer's DoRA (norm_epsilon off by default) add nothing. A LoRA
    pair with a magnitude (PEFT, kohya `.dora_scale`) gets 0; a LyCORIS module gets eps. The two
    differ by eps / ‖row‖ relative, below float32 rounding for any norm above 1.
    """
    import torch

    from loratool.adapter import LycoModule

    return float(torch.finfo(torch.float32).eps) if isinstance(module, LycoModule) else 0.0


def dora_normalise(merged: torch.Tensor, magnitude: torch.Tensor, axis: DoraAxis, *, eps: float = 0.0
                   ) -> torch.Tensor:
    """DoRA: m ⊙ V / (‖V‖ + eps) for the merged weight V = W + ΔW in the base layout (out, in, *k), float32.

    axis "out": one magnitude per output row, the norm over (in, *k) (PEFT, LyCORIS wd_on_out=True);
    "in": one per input column, the norm over (out, *k) (LyCORIS wd_on_out=False, OneTrainer DoRA,
    ComfyUI): for a conv, each input channel's norm runs over every output channel and kernel tap,
    as LyCORIS computes it (transpose(0, 1) then flatten). `magnitude` holds out (resp. in) values
    in any shape ((out,), (out, 1, ..), (1, in, ..)). The norm is of V itself, not detached
    or cached: the merged weight, not a training step.
    """
    import torch

    v = merged if merged.dtype == torch.float64 else merged.to(torch.float32)  # float64 kept (a float64 base)
    mag = magnitude.to(device=v.device, dtype=v.dtype).reshape(-1)
    lead = 0 if axis == "out" else 1
    if lead == 0:
        norm = v.reshape(v.shape[0], -1).norm(p=2, dim=1)  # (out,): each row over (in, *k), as peft
    else:  # (in,): each column over (out, *k), without a transposed copy of the weight
        norm = torch.linalg.vector_norm(v, ord=2, dim=[d for d in range(v.dim()) if d != 1])
    if eps:
        norm = norm + eps
    shape = [1] * v.dim()
    shape[lead] = v.shape[lead]
    return v * (mag / norm).reshape(shape)
