from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from loratool.cli._options import local_out, quiet_option


@dataclass(frozen=True)
class BatchOp:
    """How `batch OP` places an item among OP's arguments.

    fixed: how many positional arguments every item shares (combine's partner, merge's base, diff's
    reference, verify's adapter), given before the inputs, and `shared` their name; item_last: the item comes after them
    (combine PARTNER ITEM, merge BASE ITEM) rather than before (diff ITEM REFERENCE, verify ITEM ADAPTER);
    writes: the command writes an output (-o), named under --out-dir.
    """

    fixed: int = 0
    item_last: bool = False
    writes: bool = False
    shared: str = ""


OPS: dict[str, BatchOp] = {
    "inspect": BatchOp(), "validate": BatchOp(), "scan": BatchOp(),
    "rescale": BatchOp(writes=True), "resize": BatchOp(writes=True), "convert": BatchOp(writes=True),
    "combine": BatchOp(fixed=1, item_last=True, writes=True, shared="PARTNER"),
    "merge": BatchOp(fixed=1, item_last=True, writes=True, shared="BASE"),
    "diff": BatchOp(fixed=1, shared="REFERENCE"), "verify": BatchOp(fixed=1, shared="ADAPTER"),
}
# options batch sets itself for every item
RESERVED = {"-o", "--out", "--json", "-h", "--help"}


@click.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--out-dir", type=click.Path(), default=None, callback=local_out,
              help="Folder for the outputs of a writing OP, named after the inputs (their paths relative to the "
                   "inputs' common folder); also holds the run's ledger.jsonl.")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Items run at once: worker processes (local) or Ray tasks (ray), each reused for many items.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: worker processes on this machine; ray: tasks on a Ray cluster (pip install loratool[ray]).")
@click.option("--address", default=None, metavar="ADDR",
              help="With --executor ray: the cluster to join (default: RAY_ADDRESS, else a running local one).")
@click.option("--resume", is_flag=True,
              help="Skip items the ledger lists as done (ok or findings) with the same input content and options.")
@click.option("--ledger", type=click.Path(), default=None,
              help="The run's ledger (one JSON line per finished item); default OUT_DIR/ledger.jsonl.")
@click.option("--shard", default=None, metavar="I/N",
              help="Run only the items whose index is I modulo N (0 <= I < N): N shards cover every item once.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=600.0, show_default=True,
              help="Seconds one item may take; a slower one is stopped and reported as `timeout`.")
@click.option("--max-memory", type=click.IntRange(min=64), default=None, metavar="MB",
              help="Address space per worker in MB (RLIMIT_AS, where the OS has it); an item needing more fails alone.")
@quiet_option
@click.argument("op", type=click.Choice(sorted(OPS)), metavar="OP")
@click.argument("args", nargs=-1, type=click.UNPROCESSED, metavar="[OP OPTIONS] INPUTS...")
def batch(out_dir: str | None, jobs: int, executor: str, address: str | None, resume: bool, ledger: str | None,
          shard: str | None, timeout: float, max_memory: int | None, quiet: bool, op: str,
          args: tuple[str, ...]) -> int:
    """Run one command (OP) over many adapters: one JSON line per item on stdout, then a summary line.

    OP is inspect, validate, scan, rescale, resize, convert, combine (PARTNER first), merge (BASE
    first), diff (REFERENCE first) or verify (ADAPTER first, --base BASE); its options follow it as
    they would on its own command line (write an optional-value option as --modules=REGEX). INPUTS
    are adapters, folders of adapters, globs, JSONL/CSV manifests (`input`, `out` and per-item
    options) or hf://OWNER (every model of OWNER). Each item runs exactly the single command, in
    worker processes started once; one item failing never stops the others.

    Each line: {"type": "item", "item", "status", "exit_code", "seconds", "error", "hint", "out",
    "result" (the command's own --json document)}; the last: {"type": "summary", ...}. Exit 0 when
    every item is ok, 1 when some had findings (validate, verify) and none failed, 2 when any item
    failed, timed out or crashed, or the batch could not start.

    \b
    Example: loratool batch validate --strict uploads/ > report.ndjson
    Example: loratool batch --jobs 4 --out-dir half/ rescale --factor 0.5 loras/*.safetensors
    """
    from loratool.batch.items import ADAPTER_SUFFIXES, PICKLE_SUFFIXES, expand_inputs, manifest_outs, output_names
    from loratool.batch.items import shard as take_shard
    from loratool.errors import IncompatibleError

    spec = OPS[op]
    command = _command(op)
    options, positionals = split_args(op, command, list(args))
    if len(positionals) < spec.fixed + 1:
        raise click.UsageError(f"batch {op} needs {spec.shared + ' then ' if spec.shared else ''}at least one input")
    fixed = [_abs(p) for p in positionals[:spec.fixed]]
    suffixes = ADAPTER_SUFFIXES + PICKLE_SUFFIXES if op == "scan" else ADAPTER_SUFFIXES  # scan reads pickles safely
    items = expand_inputs(positionals[spec.fixed:], suffixes=suffixes)
    if not items:
        raise IncompatibleError("no inputs: the folders named hold no adapters")
    items = take_shard(items, shard)
    if spec.writes:
        if out_dir is None and any(i.out is None for i in items):
            raise click.UsageError(f"batch {op} writes one output per item: give --out-dir DIR "
                                   "(or an `out` for every line of a manifest)")
        if out_dir is not None:
            directory, suffix = _output_form(op, options, fixed)
            output_names(items, Path(out_dir).absolute(), directory=directory, suffix=suffix)
        else:
            manifest_outs(items)
    elif any(i.out for i in items):
        raise click.UsageError(f"{op} writes nothing: a manifest's `out` is for writing commands")
    ledger_path = Path(ledger) if ledger else (Path(out_dir) / "ledger.jsonl" if out_dir else None)
    if resume and ledger_path is None:
        raise click.UsageError("--resume needs the run's ledger: give --out-dir or --ledger")
    return run_batch(op, spec, options, fixed, items, executor=executor, address=address, jobs=jobs,
                     timeout=timeout, memory=max_memory * (1 << 20) if max_memory else None,
                     ledger_path=ledger_path, resume=resume, quiet=quiet)


def _abs(path: str) -> str:
    return path if path.startswith("hf://") else os.path.abspath(path)


def _group() -> Any:
    """The loratool group this command runs in (found through click's context, not imported: the
    group's module imports this one)."""
    return click.get_current_context().find_root().command


def _command(op: str) -> click.Command:
    return _group().commands[op]


def split_args(op: str, command: click.Command, args: list[str]) -> tuple[list[str], list[str]]:
    """OP's options (tokens as given, values included) and its positional arguments, told apart by OP's
    own click options; everything after `--` is positional.

    Raises:
        click.UsageError: an option OP does not have, one batch sets itself, or a value missing.
    """
    known: dict[str, click.Option] = {}
    for p in command.params:
        if isinstance(p, click.Option):
            for o in (*p.opts, *p.secondary_opts):
                known[o] = p
    options: list[str] = []
    positionals: list[str] = []
    i = 0
    while i < len(args):
        tok = args[i]
        if tok == "--":
            positionals += args[i + 1:]
            break
        if not tok.startswith("-") or tok == "-":
            positionals.append(tok)
            i += 1
            continue
        name, eq, _ = tok.partition("=")
        attached = False
        if name not in known and not tok.startswith("--") and tok[:2] in known:
            name, attached = tok[:2], True  # -r16
        opt = known.get(name)
        if opt is None:
            raise click.UsageError(f"loratool {op} has no option {name}")
        if name in RESERVED:
            raise click.UsageError(f"batch sets {name} itself: outputs go under --out-dir (or a manifest's `out`), "
                                   "results are JSON lines")
        options.append(tok)
        optional = getattr(opt, "_flag_needs_value", False)  # --modules[=REGEX]: a value only after `=`
        takes_value = not (opt.is_flag or opt.count or optional) and not (eq or attached)
        if takes_value:
            if i + 1 >= len(args):
                raise click.UsageError(f"{name} needs a value")
            options.append(args[i + 1])
            i += 1
        i += 1
    return options, positionals


def _output_form(op: str, options: list[str], fixed: list[str]) -> tuple[bool | None, str]:
    """(directory, suffix) of each item's output: a folder, one file (with this suffix), or None: as its input."""
    from loratool.formats import output_is_directory

    def value(*names: str) -> str | None:
        for i, tok in enumerate(options):
            name, eq, v = tok.partition("=")
            if name in names:
                return v if eq else (options[i + 1] if i + 1 < len(options) else None)
        return None

    if op == "merge":
        return os.path.isdir(fixed[0]), ".safetensors"  # the output mirrors the base
    fmt = value("--format")
    if op == "convert":
        fmt = value("--to")
        runtime = value("--for")
        if runtime is not None:
            from loratool.runtimes import RUNTIMES

            fmt = RUNTIMES[runtime].writes if runtime in RUNTIMES else None
        if fmt == "lora":
            fmt = None
    if fmt is None:
        return None, ".safetensors"
    return output_is_directory(fmt), ".gguf" if fmt == "gguf" else ".safetensors"


def item_argv(op: str, spec: BatchOp, options: list[str], fixed: list[str], item_path: str, item_options: list[str],
              out: str | None) -> list[str]:
    """The argument list of one item's command: positionals first (so a trailing optional-value option
    never swallows the item), then OP's options, the item's own, --json and -o."""
    positionals = [*fixed, item_path] if spec.item_last else [item_path, *fixed]
    return [op, *positionals, *options, *item_options, "--json", *(["-o", out] if out else [])]


def run_batch(op: str, spec: BatchOp, options: list[str], fixed: list[str], items: list[Any], *, executor: str,
              address: str | None, jobs: int, timeout: float | None, memory: int | None, ledger_path: Path | None,
              resume: bool, quiet: bool) -> int:
    """Run the items, print one JSON line each as they finish and the summary; return the batch's exit code."""
    from loratool.batch.items import Task
    from loratool.batch.ledger import Ledger, input_hash, item_key
    from loratool.cli import _render

    t0 = time.perf_counter()
    book = Ledger(ledger_path) if ledger_path is not None else None
    if book is not None and resume:
        book.load()
    counts = {"ok": 0, "findings": 0, "failed": 0, "timeout": 0, "crashed": 0, "resumed": 0}
    keys: dict[int, str] = {}
    tasks: list[Task] = []
    by_index = {item.index: item for item in items}
    cwd = os.getcwd()
    for item in items:
        if book is not None:
            keys[item.index] = item_key(op, [*options, *fixed], item.options, item.out, input_hash(item.input))
            done = book.done.get(keys[item.index])
            if done is not None:
                counts["resumed"] += 1
                _emit({**{k: v for k, v in done.items() if k != "key"}, "item": item.input, "index": item.index,
                       "resumed": True})
                continue
        if item.out is not None:  # the commands refuse a missing parent; workers never race to make one
            Path(item.out).parent.mkdir(parents=True, exist_ok=True)
        tasks.append(Task(item.index, item_argv(op, spec, options, fixed, _abs(item.input), item.options, item.out),
                          cwd))
    if executor == "ray":
        from loratool.batch.raycluster import run_ray

        outcomes = run_ray(tasks, _group().item_runner, jobs=jobs, timeout=timeout, memory=memory, address=address)
    else:
        from loratool.batch.local import run_local

        outcomes = run_local(tasks, _group().item_runner, jobs=jobs, timeout=timeout, memory=memory)
    try:
        with _render.progress(f"batch {op}", enabled=not quiet) as cb:
            cb(0, len(tasks))
            for n, outcome in enumerate(outcomes, 1):
                item = by_index[outcome.index]
                record = item_record(item, outcome)
                counts[record["status"]] += 1
                _emit(record)
                if book is not None:
                    book.append({**record, "key": keys[item.index]})
                cb(n, len(tasks))
    finally:
        if book is not None:
            book.close()
    failed = counts["failed"] + counts["timeout"] + counts["crashed"]
    code = 2 if failed else 1 if counts["findings"] else 0
    _emit({"type": "summary", "schema": 1, "op": op, "total": len(items), **counts,
           "seconds": round(time.perf_counter() - t0, 3), "exit_code": code})
    return code


def item_record(item: Any, outcome: Any) -> dict[str, Any]:
    """One NDJSON line: the item, how it ended, and the command's own --json document as `result`."""
    from loratool.errors import scrub

    doc: Any = None
    if outcome.stdout.strip():
        try:
            doc = json.loads(outcome.stdout)
        except json.JSONDecodeError:
            doc = None
    error = hint = None
    for line in outcome.stderr.splitlines():
        if line.startswith("Error: ") and error is None:
            error = line[len("Error: "):]
        elif line.startswith("Hint: ") and hint is None:
            hint = line[len("Hint: "):]
    if outcome.status is not None:
        status, error = outcome.status, outcome.detail
    else:
        status = {0: "ok", 1: "findings"}.get(outcome.code, "failed")
        if status == "failed" and error is None:
            error = f"exit status {outcome.code}"
    return {"type": "item", "schema": 1, "item": item.input, "index": item.index, "status": status,
            "exit_code": outcome.code, "seconds": round(outcome.seconds, 3),
            "error": scrub(error) if error else None, "hint": scrub(hint) if hint else None,
            "out": item.out, "result": doc}


def _emit(record: dict[str, Any]) -> None:
    click.echo(json.dumps(record, separators=(",", ":"), default=str))
