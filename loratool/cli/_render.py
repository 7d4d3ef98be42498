"""All terminal rendering: tables, summaries, progress bars. The only module that imports rich.

Results go to stdout; progress and warnings to stderr. Progress bars appear only when stderr is a
TTY and the command is not --quiet/--json.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import IO, TYPE_CHECKING, Any, cast

from rich.console import Console
from rich.text import Text

from loratool.ops import natural_key
from loratool.sizes import human_size

if TYPE_CHECKING:
    from loratool.patterns import SafePattern

_out: Console | None = None
_err: Console | None = None


class _NoTrailingSpaces:
    """A stdout wrapper that drops the spaces rich pads table cells with at line ends."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self._pending = ""

    def write(self, text: str) -> int:
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            self.f.write(line.rstrip(" ") + "\n")
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self.f.write(self._pending)
            self._pending = ""
        self.f.flush()

    def isatty(self) -> bool:
        return bool(self.f.isatty())


def natural_sorted(names: list[str]) -> list[str]:
    return sorted(names, key=natural_key)


def width() -> int:
    """Output width: COLUMNS when set (the user's stated preference), else the terminal's when any of
    stdout, stderr or stdin is one (`loratool diff ... | less` on an 80-column terminal: 80), else
    (no terminal at all: a file, a CI log) 160."""
    with contextlib.suppress(ValueError):
        n = int(os.environ.get("COLUMNS", ""))
        if n > 0:
            return n
    for stream in (sys.stdout, sys.stderr, sys.stdin):
        try:
            if stream is not None and stream.isatty():
                n = os.get_terminal_size(stream.fileno()).columns
                if n > 0:
                    return n
        except (AttributeError, OSError, ValueError):
            continue
    return 160


def out() -> Console:
    global _out
    # sys.stdout may be swapped between calls (CliRunner, capture): follow it; COLUMNS too
    tty = sys.stdout.isatty()
    w = width()
    if _out is None or getattr(_out.file, "f", None) is not sys.stdout or _out.width != w:
        _out = Console(file=cast(IO[str], _NoTrailingSpaces(sys.stdout)), width=w, highlight=False,
                       soft_wrap=not tty, force_terminal=tty)
    return _out


_MIN_WRAP = 16  # a wrapped text column narrower than this reads badly: it moves to lines of its own


def _wrap(cell: Text, room: int) -> list[Text]:
    """A text cell wrapped at spaces to `room` columns; a word longer than that (a module name) stays whole."""
    import textwrap

    if cell.cell_len <= room:
        return [cell]
    pieces = textwrap.wrap(cell.plain, max(room, 1), break_long_words=False, break_on_hyphens=False) or [""]
    return [Text(p, style=cell.style) for p in pieces]


def _longest_word(cells: list[Text]) -> int:
    from rich.cells import cell_len

    return max((cell_len(w) for c in cells for w in c.plain.split()), default=0)


def name_table(headers: list[str], rows: Sequence[Sequence[str | Text]], *, names: int = 1,
               right: set[int] | None = None, wrap: int | None = None, sort: bool = True) -> None:
    """A table whose first `names` columns are module (or tensor) names, which are never cut.

    When every row fits the output width, one line per row with aligned columns. A `wrap` column
    (free text: a message, a verdict) is folded at spaces to what the other columns leave, its
    words kept whole. When that does not fit either, each name goes on a line of its own, whole,
    and the other columns follow on an indented line, aligned across rows (kohya names are 50-90
    characters: folded into a narrow column they are unreadable); a wrap column that still does not
    fit goes on indented lines of its own. Only a word longer than the whole width overflows it.
    Rows are sorted by their first name, numbers as numbers (`sort=False` keeps the given order).
    `right` holds the indices of right-aligned columns.
    """
    right = right or set()
    c = out()
    full = c.width
    table = [[v if isinstance(v, Text) else Text(v) for v in r] for r in rows]
    if sort and names:
        table.sort(key=lambda r: natural_key(r[0].plain))
    heads = [Text(h, style="bold") for h in headers]
    widths = [max([h.cell_len] + [r[i].cell_len for r in table]) for i, h in enumerate(heads)]

    def span(idx: list[int], w: list[int]) -> int:
        return sum(w[i] for i in idx) + 2 * (len(idx) - 1) if idx else 0

    def emit(line: Text) -> None:
        line.rstrip()
        c.print(line, soft_wrap=True, highlight=False)

    def lines(values: list[Text], idx: list[int], w: list[int], indent: int) -> None:
        """One row (or the header) over these columns; the wrap column may take several lines."""
        folded = {i: (_wrap(values[i], w[i]) if i == wrap else [values[i]]) for i in idx}
        for k in range(max(len(f) for f in folded.values())):
            line = Text(" " * indent)
            for n, i in enumerate(idx):
                cell = folded[i][k] if k < len(folded[i]) else Text("")
                pad = " " * max(0, w[i] - cell.cell_len)
                if n:
                    line.append("  ")
                line.append_text(Text(pad) + cell if i in right else cell + Text(pad))
            emit(line)

    def block(idx: list[int], indent: int) -> None:
        """The header and every row over `idx` at `indent`, each name on its own line first."""
        for i in range(names):
            emit(Text("  " * i) + heads[i])
        _body(heads, idx, indent)
        for r in table:
            for i in range(names):
                emit(Text("  " * i) + r[i])
            _body(r, idx, indent)

    def _body(values: list[Text], idx: list[int], indent: int) -> None:
        rest = [i for i in idx if i != wrap]
        if wrap is None or wrap not in idx or fits_wrapped(idx, indent):
            lines(values, idx, narrowed(idx, indent), indent)
            return
        if rest:  # the text column on indented lines of its own below the others
            lines(values, rest, widths, indent)
        at = max(0, min(indent + 2 * bool(rest), full - _longest_word([r[wrap] for r in table])))
        lines(values, [wrap], [max(1, full - at) if i == wrap else x for i, x in enumerate(widths)], at)

    def narrowed(idx: list[int], indent: int) -> list[int]:
        if wrap is None or wrap not in idx:
            return widths
        room = full - indent - span([i for i in idx if i != wrap], widths) - 2 * (len(idx) > 1)
        return [min(x, room) if i == wrap else x for i, x in enumerate(widths)]

    def fits_wrapped(idx: list[int], indent: int) -> bool:
        if indent + span(idx, widths) <= full:
            return True
        room = full - indent - span([i for i in idx if i != wrap], widths) - 2 * (len(idx) > 1)
        return room >= max(_MIN_WRAP, _longest_word([r[wrap] for r in table] + [heads[wrap]]))  # type: ignore[index]

    every = list(range(len(headers)))
    if span(every, widths) <= full or (wrap is not None and fits_wrapped(every, 0)):
        lines(heads, every, narrowed(every, 0), 0)
        for r in table:
            lines(r, every, narrowed(every, 0), 0)
        return
    if not names:
        _body(heads, every, 0)
        for r in table:
            _body(r, every, 0)
        return
    block(list(range(names, len(headers))), 2 * names)


def line(text: str) -> None:
    """A plain result line folded at spaces to the output width; names in it stay whole."""
    import textwrap

    c = out()
    for piece in textwrap.wrap(text, c.width, break_long_words=False, break_on_hyphens=False) or [""]:
        c.print(piece, soft_wrap=True, markup=False, highlight=False)


def err() -> Console:
    global _err
    if _err is None or _err.file is not sys.stderr or _err.width != width():
        _err = Console(file=sys.stderr, highlight=False, width=width())
    return _err


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
    sys.stdout.flush()


def warn(message: str) -> None:
    err().print(f"[yellow]Warning:[/yellow] {message}", markup=True, highlight=False)


class Bar:
    """What a command's progress callbacks drive: `bar(done, total)` counts, `bar.phase(text)` says
    what is happening before there is anything to count. A no-op when the bar is off."""

    def __init__(self, description: str, update: Callable[..., None] | None = None) -> None:
        self.description = description
        self._update = update

    def __call__(self, done: int, total: int) -> None:
        if self._update is not None:
            self._update(completed=done, total=total)

    def phase(self, text: str) -> None:
        if self._update is not None:
            self._update(description=f"{self.description}: {text}")


@contextlib.contextmanager
def progress(description: str, enabled: bool, unit: str = "items", *, phase: str | None = None) -> Iterator[Bar]:
    """A transient rich bar on stderr from the first moment (with `phase`, e.g. "starting", as its
    first words), shown only when stderr is a terminal and `enabled` (not --quiet / --json). Counts
    appear once the command knows its total, never as `0/?`."""
    if not enabled or not sys.stderr.isatty():
        yield Bar(description)
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        SpinnerColumn,
        Task,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    class Known(ProgressColumn):
        """A column shown once the task has a total (before it: nothing, not `0/? bytes`)."""

        def __init__(self, inner: ProgressColumn) -> None:
            super().__init__()
            self.inner = inner

        def render(self, task: Task) -> Any:
            return self.inner.render(task) if task.total is not None else Text("")

    counts = [DownloadColumn(), TransferSpeedColumn()] if unit == "bytes" else [MofNCompleteColumn()]
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), *(Known(c) for c in counts),
        Known(TimeRemainingColumn()), console=err(), transient=True,
    ) as bar:
        task = bar.add_task(f"{description}: {phase}" if phase else description, total=None)
        bar.refresh()  # on screen now, not at the first tick

        def update(**fields: Any) -> None:
            bar.update(task, **fields)

        yield Bar(description, update)


def _fmt(x: float) -> str:
    if float(x).is_integer():
        return str(int(x))
    return f"{x:.6g}"


def _counts(d: dict[str, int], limit: int = 12) -> str:
    items = [f"{k}: {v}" for k, v in d.items()]
    if len(items) > limit:
        items = [*items[:limit], f"... ({len(items) - limit} more)"]
    return ", ".join(items)


def _yes(b: bool) -> str:
    return "yes" if b else "no"


BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 32) -> str:
    """Singular values as bars, scaled to the largest; buckets (max) when there are many."""
    if not values:
        return ""
    if len(values) > width:
        step = len(values) / width
        values = [max(values[int(i * step): max(int((i + 1) * step), int(i * step) + 1)]) for i in range(width)]
    top = values[0] or 1.0
    return "".join(BLOCKS[min(len(BLOCKS) - 1, max(0, math.ceil(v / top * len(BLOCKS)) - 1))] if v > 0 else " "
                   for v in values)


class _Grid:
    """Label / value lines: values folded at spaces beside their labels, words (names) kept whole;
    a word longer than what is left of the line starts a line of its own (and may overflow it)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str]] = []

    def add_row(self, label: str, value: str) -> None:
        self.rows.append((label, value))

    def print(self) -> None:
        import textwrap

        from rich.cells import cell_len

        c = out()
        pad = max((cell_len(k) for k, _ in self.rows), default=0) + 2
        room = max(c.width - pad, 20)
        for label, value in self.rows:
            pieces = textwrap.wrap(value, room, break_long_words=False, break_on_hyphens=False) or [""]
            first = Text(label.ljust(pad), style="dim")
            if cell_len(pieces[0]) > room:  # an overlong first word: the label alone, the value below
                c.print(first, soft_wrap=True)
                first = Text(" " * pad)
            for k, piece in enumerate(pieces):
                c.print((first if k == 0 else Text(" " * pad)) + Text(piece), soft_wrap=True)


def render_inspect(doc: dict[str, Any], *, modules: bool, spectrum: bool,
                   only: re.Pattern[str] | SafePattern | None = None) -> None:
    c = out()
    head = Text()
    head.append(doc["path"], style="bold")
    lyco = f", {doc['num_lycoris']} LyCORIS modules" if doc.get("num_lycoris") else ""
    fmt = f"{doc['dialect']}, {doc['format']} keys" if doc.get("dialect") else doc["format"]
    head.append(f"  ({fmt}, {doc['num_modules']} modules{lyco}, {human_size(doc['file_size'])})")
    if head.cell_len <= c.width:
        c.print(head, soft_wrap=True)
    else:  # the path alone, whole, then what it holds
        c.print(Text(doc["path"], style="bold"), soft_wrap=True)
        line(head.plain[len(doc["path"]):].strip())
    t = _Grid()
    ranks = doc["ranks"]
    alphas = doc["alphas"]
    rank_txt = (f"{ranks['min']}" if ranks["min"] == ranks["max"]
                else f"min {ranks['min']}, max {ranks['max']}, most common {ranks['most_common']}")
    t.add_row("base model", doc["base_model"] or "(not recorded)")
    architecture = (doc.get("metadata") or {}).get("modelspec.architecture")
    if architecture:
        t.add_row("architecture", architecture)
    fam = doc.get("family") or {}
    if fam.get("family") or fam.get("ambiguous"):
        t.add_row("family", _family_text(fam))
    t.add_row("rank", rank_txt if ranks["min"] is not None else "-")
    t.add_row("alpha", _counts(alphas, 6) if len(alphas) > 1 else next(iter(alphas), "-"))
    t.add_row("alpha from", _counts(doc["alpha_sources"]) or "-")
    scales = doc["scales"]
    scales = {_fmt(float(k)): v for k, v in scales.items()}
    t.add_row("scale", _counts(scales, 6) if len(scales) > 1 else next(iter(scales), "-"))
    t.add_row("rslora", _yes(doc["rslora"]))
    axes = doc.get("dora_axes") or {}
    dora = _yes(doc["dora"])
    if axes.get("in"):
        dora += f" ({axes['in']} with a magnitude per input column; merge applies them)"
    t.add_row("DoRA", dora)
    for v in doc.get("variants") or []:  # PiSSA / OLoRA / CorDA / LoftQ unconverted, aLoRA (loratool.variants)
        t.add_row("variant", f"{v['name']} ({v['setting']}; merge, combine, resize and convert refuse it unless "
                  "--allow-variant)")
    t.add_row("fan_in_fan_out", _yes(doc["fan_in_fan_out"]))
    t.add_row("kinds", _counts(doc["kinds"]) or "-")
    t.add_row("targets", _counts(doc["targets"]) or "-")
    for e in doc.get("experts") or []:  # experts of fused MoE parameters (docs/moe.md)
        ranks = ", ".join(f"{n} at rank {r}" for r, n in e["ranks"].items())
        t.add_row("experts", f"{e['parameter']}: {e['parameters']} parameter(s) × "
                  f"{'/'.join(str(c) for c in e['experts'])} experts ({ranks})")
    t.add_row("dtypes", _counts(doc["dtypes"]) or "-")
    t.add_row("LoRA params", f"{doc['lora_params']:,}")
    t.add_row("file size", human_size(doc["file_size"]))
    extras = doc["extras"]
    t.add_row("extras", ", ".join(f"{e['name']} {tuple(e['shape'])} {e['dtype']}" for e in extras[:8])
              + (f" ... ({len(extras)} total)" if len(extras) > 8 else "") if extras else "none")
    if doc.get("num_lycoris"):
        t.add_row("LyCORIS", f"{_counts(doc['lycoris_kinds'])} ({doc['lycoris_params']:,} params)")
    uns = doc["unsupported"]
    t.add_row("unsupported", f"{len(uns)} tensor(s), e.g. {', '.join(uns[:3])}" if uns else "none")
    t.print()
    meta = doc["metadata"]
    if meta:
        c.print(Text("metadata", style="bold"))
        m = _Grid()
        for k in sorted(meta):
            m.add_row(k, _readable(meta[k]))
        m.print()
    if modules or spectrum:
        _module_table(doc, spectrum, only)


def _family_text(fam: dict[str, Any]) -> str:
    """`flux.1, kohya dialect (e.g. lora_unet_double_blocks_0_img_attn_qkv)`, or what is ambiguous."""
    if fam["ambiguous"]:
        best = {c["family"]: c["dialect"] for c in reversed(fam["candidates"])
                if c["matched"] == fam["matched"] and c["family"] in fam["tied"]}  # each family's first dialect
        how = " (convert needs --family)" if fam.get("convert_needs_family", True) else \
            " (their tables convert these names alike)"
        return "ambiguous: " + " or ".join(f"{f} ({best[f]})" for f in fam["tied"]) + how
    part = "" if fam["matched"] == fam["total"] else f", {fam['matched']} of {fam['total']} modules"
    te = fam.get("text_encoder_modules") or 0
    if te:
        part += f", and {te} text-encoder module{'s' if te > 1 else ''}"
    why = "".join(f"; {r}" for r in fam.get("reasons", []))
    return f"{fam['family']}, {fam['dialect']} dialect{part} (e.g. {fam['evidence'][0]}{why})"


def _readable(value: str, limit: int = 200) -> str:
    """Metadata values: JSON made compact and legible, long values cut."""
    text = value
    if value[:1] in "{[":
        try:
            parsed = json.loads(value)
            text = json.dumps(parsed, separators=(", ", ": "), ensure_ascii=False)
        except (ValueError, RecursionError):
            pass
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def _module_table(doc: dict[str, Any], spectrum: bool, only: re.Pattern[str] | SafePattern | None = None) -> None:
    mods = [m for m in doc["modules"] if only is None or only.search(m["name"])]
    headers = ["module", "kind", "out", "in", "rank", "alpha", "from", "scale", "dtype"]
    right = {2, 3, 4, 5, 7}
    rows = [[m["name"], m["kind"], str(m["out_features"]), str(m["in_features"]), str(m["rank"]), _fmt(m["alpha"]),
             m["alpha_source"], f"{m['scale']:.4g}", m["dtype"]] for m in mods]
    # LyCORIS modules (LoHa, LoKr, ...): no LoRA factors, so no spectrum
    lyco = [m for m in doc.get("lycoris_modules", []) if only is None or only.search(m["name"])]
    rows += [[m["name"], f"{m['algo']} {m['kind']}", str(m["out_features"]), str(m["in_features"]),
              str(m["rank"] or "-"), "-" if m["alpha"] is None else _fmt(m["alpha"]), m["alpha_source"],
              f"{m['scale']:.4g}", m["dtype"]] for m in lyco]
    if not spectrum:
        name_table(headers, rows, right=right)
        return
    values = [m.get("singular_values") or [] for m in mods] + [[] for _ in lyco]
    stats = [[str(m.get("rank_90", "")), str(m.get("rank_99", "")), f"{v[0]:.3g}" if v else ""]
             for m, v in zip(mods, values)] + [["", "", ""] for _ in lyco]
    width = out().width
    longest = max((len(r[0]) for r in rows), default=0)
    spark = max((len(v) for v in values), default=1)
    # one line per module when it fits with the full sparkline; else names on their own lines, and
    # at narrow widths (80 columns) the spectrum keeps what it is about: shape, rank, alpha, scale,
    # r90/r99/σ1 and a sparkline as wide as what is left (kind/from/dtype: `inspect --modules`)
    keep = list(range(len(headers)))
    line = longest + sum(max(len(h), 6) + 2 for h in headers[1:]) + 3 * 8 + min(spark, 32)
    if line > width:
        keep = [0, 2, 3, 4, 5, 7]
    base = sum(max([len(headers[i])] + [len(r[i]) for r in rows]) + 2 for i in keep[1:]) + 2
    base += sum(max([len(h)] + [len(st[j]) for st in stats]) + 2 for j, h in enumerate(("r90", "r99", "σ1")))
    room = min(32, max(8, width - base)) if line > width else 32
    heads = [headers[i] for i in keep] + ["r90", "r99", "σ1", "spectrum"]
    rights = {k for k, i in enumerate(keep) if i in right} | {len(keep), len(keep) + 1, len(keep) + 2}
    full = [[r[i] for i in keep] + st + [sparkline(v, width=room)] for r, st, v in zip(rows, stats, values)]
    name_table(heads, full, right=rights)


def render_validate(doc: dict[str, Any]) -> None:
    findings = doc["findings"]
    if findings:
        rows: list[list[str | Text]] = [
            [Text(f["severity"], style="red" if f["severity"] == "error" else "yellow"), f["code"], f["message"]]
            for f in findings]
        name_table(["severity", "code", "message"], rows, names=0, wrap=2)
    base = f", {doc['matched']} matched in {doc['base']}" if doc["base"] else ""
    storage = doc.get("base_storage")
    if storage and storage["quantized"]:
        base += f", base stored as {storage['description']}"
    verdict = "OK" if doc["ok"] else "FAILED"
    line(f"{verdict}: {doc['path']} ({doc['format']}, {doc['num_modules']} modules{base}): "
            f"{doc['num_errors']} error(s), {doc['num_warnings']} warning(s)")


def wrote(out_path: str, what: str, size: int) -> None:
    """The one closing line of every write command: never folded, so a script can take it with `tail -1`."""
    out().print(f"Wrote {out_path} ({what}, {human_size(size)})", soft_wrap=True, markup=False, highlight=False)


def _rank_span(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}..{hi}"


def render_resize(doc: dict[str, Any]) -> None:
    rows = doc["modules"]
    headers = ["module", "rank", "new", "kept (fro)", "rel. error"]
    table = [[
        m["name"], str(m["old_rank"]), str(m["new_rank"]), f"{m['fro_retained']:.2%}", f"{m['rel_error']:.3g}"
    ] for m in rows]
    name_table(headers, table, names=1, right={1, 2, 3, 4})
    if rows:
        old = _rank_span([m["old_rank"] for m in rows])
        new = _rank_span([m["new_rank"] for m in rows])
        line(f"mean Frobenius retention {doc['mean_fro_retained']:.2%}; "
                    f"params {doc['old_params']:,} -> {doc['new_params']:,}")
        resized = len(rows)
        count = f"{doc['num_modules']} modules" if resized == doc["num_modules"] else \
            f"{resized} of {doc['num_modules']} modules"
        what = f"{count}, rank {old} -> {new}"
    else:
        what = f"{doc['num_modules']} modules"
    wrote(doc["out"], what, doc["size"])


def render_rescale(doc: dict[str, Any]) -> None:
    rows = doc["modules"]
    headers = ["module", "alpha", "new alpha", "scale", "new scale", "delta ×"]
    table = [[
        m["name"], _fmt(m["old_alpha"]), _fmt(m["new_alpha"]), f"{m['old_scale']:.6g}", f"{m['new_scale']:.6g}",
        f"{m['delta_factor']:.6g}"
    ] for m in rows]
    name_table(headers, table, names=1, right={1, 2, 3, 4, 5})
    value = f" {doc['value']:g}" if doc["value"] is not None else ""
    removed = f", {len(doc['removed'])} removed" if doc.get("removed") else ""
    wrote(doc["out"], f"{len(rows)} of {doc['num_modules']} modules, {doc['mode'].replace('_', '-')}{value}"
          f"{removed}", doc["size"])


def render_merge(doc: dict[str, Any]) -> None:
    if doc["unmatched"]:
        line(f"skipped {len(doc['unmatched'])} unmatched module(s)")
    verb = "unmerged" if doc["unmerge"] else "merged"
    adapters = len(doc["adapters"])
    what = (f"{doc['merged_tensors']} tensors {verb} from {adapters} adapter{'s' if adapters > 1 else ''}"
            + (f", {doc['replaced_tensors']} replaced" if doc["replaced_tensors"] else "")
            + f", {doc['copied_tensors']} copied, {doc['num_files']} file{'s' if doc['num_files'] > 1 else ''}"
            + (f", max cast error {doc['max_cast_error']:.3g}" if doc["max_cast_error"] is not None else "")
            + (f", delta retained ≥ {doc['min_retained']:.3f} (rel. error ≤ {doc['max_rel_error']:.3g})"
               if doc.get("min_retained") is not None else ""))
    wrote(doc["out"], what, doc["size"])


def _combine_row(m: dict[str, Any]) -> list[str]:
    ranks = " + ".join("-" if r is None else str(r) for r in m["input_ranks"])
    kept = "-" if m["fro_retained"] is None else f"{m['fro_retained']:.2%}"
    err = "-" if m["rel_error"] is None else f"{m['rel_error']:.3g}"
    return [m["name"], ranks, str(m["rank"]), kept, err]


def render_combine(doc: dict[str, Any]) -> None:
    rows = doc["modules"]
    headers = ["module", "input ranks", "rank", "kept (fro)", "rel. error"]
    table = [_combine_row(m) for m in rows]
    name_table(headers, table, names=1, right={1, 2, 3, 4})
    weights = ", ".join(_fmt(w) for w in doc["weights"])
    extra = "".join(f", {k.replace('_', ' ')} {doc[k]}" for k in ("density", "majority_sign", "seed")
                    if doc[k] is not None)
    worst = doc["max_rel_error"]
    line(f"{doc['method']} of {len(doc['inputs'])} adapters, weights {weights}{extra}; "
                f"largest relative error to the exact weighted sum {'-' if worst is None else f'{worst:.3g}'}")
    what = f"{doc['num_modules']} modules"
    if rows:
        what += f", rank {_rank_span([m['rank'] for m in rows])}"
    wrote(doc["out"], what, doc["size"])


def _holds(doc: dict[str, Any]) -> str:
    """One line saying what a pulled path holds (the inspect header, plus ranks/alpha/targets/base)."""
    s = doc["summary"]
    if doc["kind"] == "adapter":
        ranks = s["ranks"]
        rank = "-" if ranks["min"] is None else (str(ranks["min"]) if ranks["min"] == ranks["max"]
                                                 else f"{ranks['min']}..{ranks['max']}")
        alphas = ", ".join(s["alphas"]) or "-"
        targets = ", ".join(list(s["targets"])[:8]) + (", ..." if len(s["targets"]) > 8 else "")
        return (f"{s['format']}, {s['num_modules']} modules, rank {rank}, alpha {alphas}, targets {targets or '-'}, "
                f"base {s['base_model'] or '(not recorded)'}, {human_size(s['file_size'])}")
    if doc["kind"] == "checkpoint":
        return (f"checkpoint, {s['num_tensors']} tensors ({s['params']:,} params) in {s['num_files']} file(s), "
                f"{human_size(s['size'])}")
    return f"not an adapter or checkpoint: {s['num_files']} file(s), {human_size(s['size'])}"


def render_pull(doc: dict[str, Any]) -> None:
    """The local path alone on the first line (scripts take it), then what it holds and where from."""
    c = out()
    c.print(doc["path"], markup=False, soft_wrap=True)
    rev = doc["revision"] + (f" ({doc['commit'][:12]})" if doc["commit"] else "")
    # one line, never folded: scripts read the path from the first line and the summary from the second
    c.print(f"{_holds(doc)}; from {doc['repo_id']}@{rev}", markup=False, highlight=False, soft_wrap=True)


def render_push(doc: dict[str, Any]) -> None:
    out().print(doc["commit_url"], markup=False, soft_wrap=True)
    card = {"generated": "card generated", "replaced": "card replaced", "kept": "existing card kept",
            "uploaded": "your README.md", "fixed": "your README.md with its base_model fixed"}[doc["card"]]
    what = f"{len(doc['files'])} files, {card}, commit {doc['commit'][:12]}"
    if not doc["new_commit"]:
        what += ", nothing changed"
    wrote(f"hf://{doc['repo_id']}@{doc['revision']}", what, doc["size"])


def render_extract(doc: dict[str, Any]) -> None:
    rows = doc["modules"]
    headers = ["module", "kind", "shape", "rank", "kept energy", "rel. error", "svd"]
    table = [[
        m["name"] + (" (+bias)" if m["bias"] else ""), m["kind"], "x".join(map(str, m["shape"])), str(m["rank"]),
        f"{m['kept_energy']:.4%}", f"{m['rel_error']:.3g}", m["method"]
    ] for m in rows]
    name_table(headers, table, names=1, right={2, 3, 4, 5})
    changed = doc["changed"]
    saved = [c["key"] for c in changed if c["action"] == "saved"]
    skipped = [c for c in changed if c["action"] == "skipped"]
    if saved:
        line(f"stored whole (modules_to_save): {_names(saved)}")
    if skipped:
        listed = _names([f"{c['key']} ({c['reason']})" for c in skipped])
        line(f"changed but not stored: {listed}")
    line(f"{doc['unchanged']} unchanged tensor(s) skipped; SVD exact for {doc['methods']['exact']}, "
                f"randomized for {doc['methods']['randomized']} module(s)")
    what = f"{doc['num_modules']} modules"
    if rows:
        what += f", rank {_rank_span([m['rank'] for m in rows])}"
    if saved:
        what += f", {len(saved)} saved tensor{'s' if len(saved) > 1 else ''}"
    wrote(doc["out"], what, doc["size"])


def _names(names: list[str], limit: int = 4) -> str:
    names = natural_sorted(names)
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def render_convert(doc: dict[str, Any]) -> None:
    rows = doc["modules"]
    headers = ["module", "from", "rank", "scale", "placed by"]
    lyco = any(m.get("from_algo", "lora") != "lora" for m in rows)
    if lyco:
        headers += ["was", "error"]
    table = []
    for m in rows:
        row = [m["new_name"], "=" if m["name"] == m["new_name"] else m["name"], str(m["rank"] or "-"),
               f"{m['scale']:.6g}", m["placed_by"]]
        if lyco:
            exact = f" r{m['exact_rank']}" if m.get("exact_rank") else ""
            kept = m["from_algo"] in ("full", "norm", "bias") and not m.get("exact_rank")
            row += [m["from_algo"] + exact, "kept" if kept else f"{m['rel_error']:.2e}" if m["rel_error"] else "exact"]
        table.append(row)
    name_table(headers, table, names=2, right={2, 3, 6})
    what = f"{doc['num_modules']} modules, {doc['source_format']} -> {doc['format']}"
    if doc["extras"]:
        what += f", {len(doc['extras'])} saved tensors"
    if doc.get("runtime"):
        what += f", for {doc['runtime']}"
        if doc.get("rank") is not None:
            what += f": rank {doc['rank']}, alpha {doc['alpha']:.6g}, {len(doc['baked'])} scale(s) baked"
        if doc.get("dropped"):
            what += f", {len(doc['dropped'])} dropped"
    wrote(doc["out"], what, doc["size"])


def _pair(values: list[Any], fmt: Callable[[Any], str] = str) -> str:
    a, b = values
    return fmt(a) if a == b else f"{fmt(a)} -> {fmt(b)}"


def render_diff(doc: dict[str, Any], *, show_all: bool) -> None:
    rows = [m for m in doc["modules"] if show_all or m["distance"] != 0 or m["differences"]]
    if rows:
        table: list[list[str | Text]] = []
        for m in rows:
            rel = "n/a" if m["rel_distance"] is None else f"{m['rel_distance']:.3g}"
            cos = "n/a" if m["cosine"] is None else f"{m['cosine']:.6f}"
            table.append([m["name"], _pair(m["rank_ab"]), _pair(m["alpha_ab"], _fmt), _pair(m["dtype_ab"]), rel, cos,
                          ", ".join(m["differences"])])
        name_table(["module", "rank", "alpha", "dtype", "rel. distance", "cosine", "differs"], table,
                   right={1, 2, 3, 4, 5}, wrap=6, sort=False)  # the op's order: the largest distance first
    for side, key in (("A", "only_in_a"), ("B", "only_in_b")):
        if doc[key]:
            line(f"only in {side} ({len(doc[key])}): {_names(doc[key])}")
    for what, key in (("saved tensors only in A", "extras_only_in_a"), ("saved tensors only in B", "extras_only_in_b"),
                      ("saved tensors that differ", "extras_differ")):
        if doc[key]:
            line(f"{what} ({len(doc[key])}): {_names(doc[key])}")
    same = sum(1 for m in doc["modules"] if m["distance"] == 0)
    worst = doc["max_rel_distance"]
    summary = (f"{doc['num_common']} modules in both ({same} identical deltas), {len(doc['only_in_a'])} only in A, "
               f"{len(doc['only_in_b'])} only in B")
    if worst is not None:
        summary += f"; largest relative distance {worst:.3g}"
    line(("IDENTICAL: " if doc["identical"] else "") + summary)


def render_verify(doc: dict[str, Any], *, show_all: bool) -> None:
    rows = [t for t in doc["tensors"] if show_all or not t["ok"]]
    if rows:
        headers = ["tensor", "expected", "verdict", "k", "residual"]
        quantized = doc.get("quantized")
        if quantized:
            headers.append("bound")  # what requantization allows, same scale as residual
        table: list[list[str | Text]] = []
        for r in rows:
            verdict = Text(r["label"], style="" if r["ok"] else "red")
            k = "" if r["factor"] is None else f"{r['factor']:.4g}"
            res = "" if r["residual"] is None else f"{r['residual']:.2g}"
            cells: list[str | Text] = [r["key"], r["expected"], verdict, k, res]
            if quantized:
                cells.append("" if r["storage"] is None or r["tolerance"] is None else f"{r['tolerance']:.2g}")
            table.append(cells)
        name_table(headers, table, right={3, 4, 5}, wrap=2)
    if doc.get("quantized"):
        line(f"Base stored quantized: {doc['storage']}; merged tensors checked against requantizing "
             "BASE + delta with the same scheme (bound: twice that requantization's error)")
    for what, key in (("missing from MERGED", "missing"), ("not in the base", "extra")):
        if doc[key]:
            line(f"{len(doc[key])} tensor(s) {what}: {_names(doc[key])}")
    counts = ", ".join(f"{n} {v}" for v, n in sorted(doc["verdicts"].items(), key=lambda kv: (-kv[1], kv[0])))
    outcome = "OK" if doc["ok"] else "FAILED"
    line(f"{outcome}: {doc['merged']}: {doc['num_tensors']} tensors: {counts or 'none'}"
            + (f"; {doc['dtype_changed']} with another dtype" if doc["dtype_changed"] else "")
            + (f"; {doc['num_findings']} finding(s)" if doc["num_findings"] else ""))
