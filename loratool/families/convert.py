"""Move a LoRA between the dialects of one model family, splitting and fusing modules exactly.

Split (fused original module -> its diffusers parts): every part shares the fused module's A and
takes its rows of B; alpha and scale unchanged. Exact, bit for bit.

Fuse (diffusers parts -> the fused original module): when every part is present with the same A
and scale (what a split produced), A is kept and the B rows are stacked: the round trip is
bit-identical. Otherwise A_i are stacked and B is block-diagonal (rank = Σ r_i), exact; a missing
part contributes zero rows. `fuse_rank` truncates a block-diagonal result to its best rank-N
approximation (exact low-rank SVD) and reports the relative error.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from loratool.adapter import Adapter, LoraModule, LycoModule
from loratool.errors import IncompatibleError
from loratool.families.model import Family, Relation
from loratool.io.tensors import TensorRef

if TYPE_CHECKING:
    import torch


@dataclass
class FamilyModule:
    """One written module of a family conversion, for the report."""

    name: str
    sources: list[str]
    rank: int
    how: str  # "rename", "split", "fuse" (shared A), "fuse-block" (block-diagonal), "fuse-truncated"
    rel_error: float = 0.0


@dataclass
class FamilyConversion:
    modules: dict[str, LoraModule] = field(default_factory=dict)
    rows: list[FamilyModule] = field(default_factory=list)
    lycoris: dict[str, LycoModule] = field(default_factory=dict)  # full / norm / bias diffs, renamed


def _listing(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def convert_family(
    adapter: Adapter, family: Family, source: str, target: str, *, fuse_rank: int | None = None
) -> FamilyConversion:
    """The adapter's modules named and shaped for `target` (a dialect of `family`).

    Raises:
        IncompatibleError: modules the family's table does not know (all listed), DoRA modules,
            or rows that do not split as the table says.
    """
    groups: dict[tuple[str, int | None], tuple[Relation, dict[str | None, LoraModule]]] = {}
    unknown: list[str] = []
    for name, m in adapter.modules.items():
        ident = family.identify(name, source, (m.out_features, m.in_features))
        if ident is None:
            # a known name of a shape the table does not list (SD3's context modulation: 6 or 2 chunks)
            by_name = family.identify(name, source)
            unknown.append(name if by_name is None else
                           f"{name} ({m.out_features} x {m.in_features}, not a shape the table lists for it)")
            continue
        rel, i, split = ident
        if m.magnitude is not None and not rel.is_plain:  # a rename keeps DoRA as it is
            raise IncompatibleError(f"{adapter.path}: module '{name}' is DoRA; splitting and fusing DoRA "
                                    "modules is not supported", hint="convert within one dialect")
        if m.kind != "linear" and not rel.is_plain:
            raise IncompatibleError(f"{adapter.path}: module '{name}' is a {m.kind} module; {family.name} "
                                    "modules that split or fuse are linear")
        _, members = groups.setdefault((rel.original, i), (rel, {}))
        members[split] = m
    out = FamilyConversion()
    to_original = family.writes_original(target)
    # within one dialect each module keeps the side it names (SD1.x's kohya names may be either side)
    same_dialect = source == target
    for name, lm in adapter.lycoris.items():
        # LyCORIS full / norm / bias diffs (Wan LoRAs carry them for biases and norms) move by name;
        # the shape picks between same-named relations (a bias-only diff, in 0, fits none of them)
        ident = family.identify(name, source, (lm.out_features, lm.in_features))
        if ident is None:
            unknown.append(name)
            continue
        rel, i, split = ident
        if same_dialect:
            template = split or rel.original
            path = template.replace("{i}", str(i)) if i is not None else template
            new = family.name_in(target, path, original=split is None)
            out.lycoris[new] = replace(lm, name=new)
            out.rows.append(FamilyModule(new, [name], lm.rank, "rename"))
            continue
        if not rel.is_plain:
            raise IncompatibleError(
                f"{adapter.path}: module '{name}' is a LyCORIS {lm.algo} diff of a module that {family.name} "
                f"{'fuses' if split is not None else 'splits'} between dialects; only LoRA factors split and fuse",
                hint="convert within the same side (kohya <-> comfyui, diffusers <-> peft)")
        template = rel.original if to_original else rel.split[0][0]
        path = template.replace("{i}", str(i)) if i is not None else template
        new = family.name_in(target, path, original=to_original)
        out.lycoris[new] = replace(lm, name=new)
        out.rows.append(FamilyModule(new, [name], lm.rank, "rename"))
    if unknown:
        raise IncompatibleError(
            f"{adapter.path}: {len(unknown)} module(s) are not {family.title} modules in the {source} dialect: "
            f"{_listing(unknown)}",
            hint="check the family and dialect with: loratool inspect ADAPTER",
        )
    for (_, i), (rel, members) in groups.items():
        def fill(template: str, i: int | None = i) -> str:
            return template.replace("{i}", str(i)) if i is not None else template

        if same_dialect and len({split is None for split in members}) == 1:
            to_original = None in members
        else:
            to_original = family.writes_original(target)
        if rel.is_plain or (None in members) == to_original:
            # same side (or a plain rename): names change, factors stay
            for split, m in members.items():
                # a plain relation changes side by its names alone; otherwise the side stays
                if to_original:
                    template = rel.original if rel.is_plain or split is None else split
                else:
                    template = rel.split[0][0] if rel.is_plain or split is None else split
                path = fill(template)
                new = family.name_in(target, path, original=to_original)
                out.modules[new] = m.with_(name=new)
                out.rows.append(FamilyModule(new, [m.name], m.rank, "rename"))
            continue
        if None in members:  # split the fused original module
            _split(out, family, rel, fill, members[None], target)
        else:
            _fuse(out, family, rel, fill, members, target, fuse_rank, adapter)
    return out


def _chunk_rows(rel_chunks: dict[str, str], names: tuple[str, ...], total: int, width: int, where: str) -> list[int]:
    from loratool.maths.fuse import row_sizes

    try:
        return row_sizes([rel_chunks[c] for c in names], total, width)
    except ValueError as e:
        raise IncompatibleError(f"module '{where}': {e}") from None


def _effective_bias(m: LoraModule) -> torch.Tensor | None:
    if m.bias is None:
        return None
    b = m.bias.load()
    return b if m.bias_scale == 1.0 else (b.float() * m.bias_scale).to(b.dtype)


def _split(out: FamilyConversion, family: Family, rel: Relation, fill, m: LoraModule, target: str) -> None:  # type: ignore[no-untyped-def]
    import torch

    sizes = dict(rel.chunks)
    names = tuple(c for c, _ in rel.chunks)
    rows = _chunk_rows(sizes, names, m.out_features, m.in_features, m.name)
    up = m.up.load()
    bias = _effective_bias(m)
    pieces = dict(zip(names, torch.split(up, rows, dim=0)))
    bias_pieces = dict(zip(names, torch.split(bias, rows, dim=0))) if bias is not None else {}
    for template, chunks in rel.split:
        new = family.name_in(target, fill(template), original=False)
        # one chunk: its rows are a contiguous view of B (no copy); several: concatenated in this order
        new_up = pieces[chunks[0]] if len(chunks) == 1 else torch.cat([pieces[c] for c in chunks], dim=0)
        new_bias = None if bias is None else (
            bias_pieces[chunks[0]] if len(chunks) == 1 else torch.cat([bias_pieces[c] for c in chunks]))
        out.modules[new] = m.with_(
            name=new, up=TensorRef.from_tensor(new_up),
            bias=TensorRef.from_tensor(new_bias) if new_bias is not None else None, bias_scaled=False,
        )
        out.rows.append(FamilyModule(new, [m.name], m.rank, "split"))


def _fuse(out: FamilyConversion, family: Family, rel: Relation, fill, members: dict[str | None, LoraModule],  # type: ignore[no-untyped-def]
          target: str, fuse_rank: int | None, adapter: Adapter) -> None:
    import torch

    sizes = dict(rel.chunks)
    order = [c for c, _ in rel.chunks]
    width = next(iter(members.values())).in_features
    # the rows of every chunk, from the split modules present (their own out sizes) or the table
    chunk_rows: dict[str, int] = {}
    pieces: dict[str, tuple[torch.Tensor, LoraModule]] = {}
    bias_pieces: dict[str, torch.Tensor] = {}
    for template, chunks in rel.split:
        m = members.get(template)
        if m is None:
            continue
        rows = _chunk_rows(sizes, chunks, m.out_features, width, m.name)
        up = m.up.load()
        bias = _effective_bias(m)
        for c, piece in zip(chunks, torch.split(up, rows, dim=0)):
            pieces[c] = (piece, m)
            chunk_rows[c] = piece.shape[0]
        if bias is not None:
            bias_pieces.update(zip(chunks, torch.split(bias, rows)))
    for c in order:
        if c not in chunk_rows:
            spec = sizes[c]
            if not spec.endswith("h"):
                raise IncompatibleError(
                    f"{adapter.path}: the {fill(rel.original)} part '{c}' is missing and its size is not fixed by "
                    "the table", hint="convert within the diffusers dialect instead")
            chunk_rows[c] = (int(spec[:-1]) if spec[:-1] else 1) * width
    sources = sorted({m.name for m in members.values()})
    new = family.name_in(target, fill(rel.original), original=True)
    present = [m for m in members.values()]
    first = present[0]
    ups = [pieces[c][0] if c in pieces else None for c in order]
    # parts sharing one A (what a split wrote, or XLabs' qkv): B's row blocks stacked, a part that
    # is missing as zero rows (its delta is zero), at the same rank
    shared = (len({id(m) for m in present}) == len(present)
              and all(m.rank == first.rank and m.scale == first.scale and m.down.dtype == first.down.dtype
                      for m in present)
              and all(torch.equal(m.down.load(), first.down.load()) for m in present[1:]))
    if shared:
        up = torch.cat([u if u is not None else first.up.load().new_zeros(chunk_rows[c], first.rank)
                        for c, u in zip(order, ups)], dim=0).contiguous()
        how, down, alpha, rslora = "fuse", first.down.load(), first.alpha, first.rslora
        scale = first.scale
    else:
        parts: list[tuple[torch.Tensor | None, torch.Tensor | None, float]] = []
        for c in order:
            if c in pieces:
                piece, m = pieces[c]
                parts.append((piece, m.down.load(), m.scale))
            else:
                parts.append((None, None, 0.0))
        # each split module's A appears once: blocks of one module share its columns
        up, down, scale = _fuse_by_module(parts, [chunk_rows[c] for c in order], [pieces[c][1] if c in pieces
                                                                                    else None for c in order])
        how, alpha, rslora = "fuse-block", scale * down.shape[0], False
    err = 0.0
    if fuse_rank is not None and down.shape[0] > fuse_rank:
        from loratool.maths.svd import fro_retained, lowrank_svd

        u, s, vh = lowrank_svd(up.double(), down.double())
        k = fuse_rank
        root = s[:k].sqrt()
        kept = fro_retained(s, k)
        err = max(0.0, 1.0 - kept * kept) ** 0.5
        up = (u[:, :k] * root).to(up.dtype).contiguous()
        down = (root[:, None] * vh[:k]).to(down.dtype).contiguous()
        alpha, rslora, how = scale * k, False, "fuse-truncated"
    bias = None
    if bias_pieces:
        ref = next(iter(bias_pieces.values()))
        bias = torch.cat([bias_pieces.get(c, torch.zeros(chunk_rows[c], dtype=ref.dtype)) for c in order])
    out.modules[new] = LoraModule(
        name=new, down=TensorRef.from_tensor(down.contiguous()), up=TensorRef.from_tensor(up), alpha=float(alpha),
        alpha_source="tensor", rslora=rslora, bias=TensorRef.from_tensor(bias) if bias is not None else None,
        bias_scaled=False, kind="linear",
    )
    out.rows.append(FamilyModule(new, sources, down.shape[0], how, err))


def _fuse_by_module(parts: list[tuple[torch.Tensor | None, torch.Tensor | None, float]], rows: list[int],
                    owners: list[LoraModule | None]) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Block-diagonal fusion where chunks of one split module (norm_out's scale and shift) share its A."""
    import torch

    from loratool.maths.fuse import block_diagonal_fuse

    if len({id(o) for o in owners if o is not None}) == sum(o is not None for o in owners):
        return block_diagonal_fuse(parts, rows)
    # several chunks per module: stack each module's A once, place its chunks in its columns
    uniq: list[LoraModule] = []
    for o in owners:
        if o is not None and all(o is not u for u in uniq):
            uniq.append(o)
    s0 = uniq[0].scale
    dtype = uniq[0].up.dtype
    cols: dict[int, int] = {}
    col = 0
    for o in uniq:
        cols[id(o)] = col
        col += o.rank
    up = torch.zeros(sum(rows), col, dtype=getattr(torch, dtype))
    row = 0
    for (u, _, s), n, o in zip(parts, rows, owners):
        if u is not None and o is not None:
            block = u if s == s0 else (u.float() * (s / s0)).to(u.dtype)
            up[row:row + n, cols[id(o)]:cols[id(o)] + o.rank] = block
        row += n
    return up, torch.cat([o.down.load() for o in uniq], dim=0), s0
