"""The work list of a batch run: inputs -> items, shards, and the output name of each item."""

from __future__ import annotations

import csv
import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratool.errors import IncompatibleError

# files a folder of adapters is searched for (pickles only when the command allows them, by name)
ADAPTER_SUFFIXES = (".safetensors", ".gguf", ".npz")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")  # listed from folders only when asked (batch scan)
# what makes a folder one adapter rather than a folder of adapters
ADAPTER_DIR_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapters.safetensors",
                     "adapter_model.bin", "pytorch_lora_weights.safetensors")
MANIFEST_SUFFIXES = (".jsonl", ".csv")


@dataclass
class Item:
    """One adapter to run the command on.

    Attributes:
        input: the path (or hf:// URL) as the user gave it or the manifest named it; NDJSON's `item`.
        out: the output path of a writing command (None: derived under --out-dir, or none needed).
        options: extra command-line tokens for this item alone (a manifest's columns).
        index: position in the whole work list (before sharding): shards and the output order use it.
        origin: the folder of the manifest that named it (a relative `out` without --out-dir is relative to it).
    """

    input: str
    out: str | None = None
    options: list[str] = field(default_factory=list)
    index: int = 0
    origin: str | None = None


@dataclass
class Task:
    """What a worker runs: the command's argument list, from the directory the batch was started in,
    with the settings loratool reads from the environment as they were when the batch started (a
    worker forked from a forkserver started earlier, or a Ray worker, would otherwise have its own)."""

    index: int
    argv: list[str]
    cwd: str
    env: dict[str, str] = field(default_factory=lambda: settings())


# environment variables that change what a command does (Hub endpoint, token, cache, offline, debug)
SETTINGS_PREFIXES = ("HF_", "HUGGING_FACE_", "HUGGINGFACE_", "LORATOOL_", "TRANSFORMERS_OFFLINE")


def settings() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(SETTINGS_PREFIXES)}


def apply_settings(env: dict[str, str]) -> None:
    """Make this process's loratool settings those of `env` (in a worker, before each task)."""
    for k in [k for k in os.environ if k.startswith(SETTINGS_PREFIXES) and k not in env]:
        del os.environ[k]
    os.environ.update(env)


@dataclass
class Outcome:
    """What came back from a worker for one task.

    status: None when the command ran to an exit code; "timeout" when it passed the time bound and
    its worker was stopped; "crashed" when the worker died (a signal, the kernel's OOM killer).
    """

    index: int
    code: int
    stdout: str
    stderr: str
    seconds: float
    status: str | None = None
    detail: str | None = None


def expand_inputs(inputs: list[str], *, suffixes: tuple[str, ...] = ADAPTER_SUFFIXES) -> list[Item]:
    """Paths, globs, folders of adapters, JSONL/CSV manifests and hf://OWNER listings -> items, in order.

    A path that does not exist stays an item (its command fails for it alone, with its own error);
    a glob that matches nothing, or an unreadable manifest, is the caller's error. The same input
    named twice is one item. `suffixes`: the files a folder is searched for.

    Raises:
        IncompatibleError: a glob matching nothing, a malformed manifest line.
    """
    items: list[Item] = []
    for text in inputs:
        if text.startswith("hf://"):
            items += _hub_listing(text)
        elif Path(text).suffix.lower() in MANIFEST_SUFFIXES and Path(text).is_file():
            items += read_manifest(Path(text))
        elif glob.has_magic(text):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise IncompatibleError(f"{text}: the pattern matches nothing")
            for m in matches:
                items += _path_items(m, suffixes)
        else:
            items += _path_items(text, suffixes)
    seen: set[tuple[str, str | None, tuple[str, ...]]] = set()
    unique: list[Item] = []
    for item in items:
        key = (_same(item.input), item.out, tuple(item.options))
        if key not in seen:
            seen.add(key)
            item.index = len(unique)
            unique.append(item)
    return unique


def _same(path: str) -> str:
    return path if path.startswith("hf://") else os.path.abspath(path)


def is_adapter_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in ADAPTER_DIR_FILES)


def _path_items(text: str, suffixes: tuple[str, ...]) -> list[Item]:
    """A file or adapter folder is one item; any other folder holds items (never following a link out)."""
    path = Path(text)
    if not path.is_dir() or path.is_symlink() or is_adapter_dir(path):
        return [Item(text)]
    found: list[Item] = []
    for child in sorted(path.iterdir(), key=lambda p: p.name):
        if child.is_symlink():
            continue  # a link may point out of the folder the user named
        if (child.is_file() and child.suffix.lower() in suffixes) or (child.is_dir() and is_adapter_dir(child)):
            found.append(Item(str(child)))
    return found


def read_manifest(path: Path) -> list[Item]:
    """A JSONL manifest (one object a line) or a CSV one (a header row): `input`, optional `out`, and any
    other field as that command's option for this item (`factor: 0.5` -> `--factor 0.5`, `true` -> a
    flag, `options: [...]` -> tokens as they are). Relative paths are relative to the manifest's folder.

    Raises:
        IncompatibleError: a line that is not an object with `input`, naming the line.
    """
    rows: list[tuple[int, dict[str, Any]]] = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise IncompatibleError(f"{path}: cannot read the manifest ({e})") from None
    if path.suffix.lower() == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise IncompatibleError(f"{path}:{n}: not JSON ({e.msg})") from None
            rows.append((n, row))
    else:
        for n, row in enumerate(csv.DictReader(text.splitlines()), 2):
            rows.append((n, {k: v for k, v in row.items() if k is not None and v not in (None, "")}))
    items = []
    for n, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("input"), str) or not row["input"]:
            raise IncompatibleError(f"{path}:{n}: each line needs an `input` (a path or hf:// URL)",
                                    hint='e.g. {"input": "a.safetensors", "out": "a_half.safetensors", "factor": 0.5}')
        inp = row.pop("input")
        out = row.pop("out", None)
        extra = row.pop("options", [])
        if isinstance(extra, str):
            extra = extra.split()
        if not isinstance(extra, list) or not all(isinstance(t, str) for t in extra):
            raise IncompatibleError(f"{path}:{n}: `options` must be a list of strings")
        tokens = list(extra)
        for key, value in row.items():
            flag = "--" + str(key).replace("_", "-")
            if value is True or (isinstance(value, str) and value.lower() == "true"):
                tokens.append(flag)
            elif value is False or value is None or (isinstance(value, str) and value.lower() == "false"):
                continue
            else:
                tokens += [flag, str(value)]
        items.append(Item(_beside(path, inp), str(out) if out is not None else None, tokens, origin=str(path.parent)))
    return items


def _beside(manifest: Path, text: str) -> str:
    if text.startswith("hf://") or os.path.isabs(text):
        return text
    return str(manifest.parent / text)


def _hub_listing(url: str) -> list[Item]:
    """hf://OWNER -> one item per model repository of OWNER; any longer hf:// URL is one item."""
    owner = url[len("hf://"):].strip("/")
    if not owner or "/" in owner:
        return [Item(url)]
    # the hub package's own client and error mapping (HF_ENDPOINT, HF_TOKEN, offline, timeouts)
    from loratool.hub._env import _api, _endpoint, _offline, _token
    from loratool.hub.errors import _boundary

    endpoint, token = _endpoint(None), _token(None)
    with _boundary(where=f"listing the models of {owner}", endpoint=endpoint, token=token, offline=_offline()):
        repos = sorted(m.id for m in _api(endpoint, token).list_models(author=owner))
    return [Item(f"hf://{repo}") for repo in repos]


def shard(items: list[Item], spec: str | None) -> list[Item]:
    """--shard I/N: the items whose index is I modulo N (0 <= I < N), so N shards cover each item once.

    Raises:
        IncompatibleError: a malformed spec.
    """
    if spec is None:
        return items
    i, n = parse_shard(spec)
    return [item for item in items if item.index % n == i]


def parse_shard(spec: str) -> tuple[int, int]:
    try:
        i_s, n_s = spec.split("/")
        i, n = int(i_s), int(n_s)
    except ValueError:
        raise IncompatibleError(f"--shard {spec!r}: expected I/N, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise IncompatibleError(f"--shard {spec!r}: I must be in 0..N-1 and N at least 1",
                                hint="Slurm: --array=0-3 with --shard $SLURM_ARRAY_TASK_ID/4")
    return i, n


def manifest_outs(items: list[Item]) -> None:
    """Without --out-dir: a manifest's relative `out` is relative to the manifest's folder."""
    for item in items:
        if item.out is not None and item.origin is not None and not os.path.isabs(item.out):
            item.out = str(Path(item.origin) / item.out)


def output_names(items: list[Item], out_dir: Path, *, directory: bool | None, suffix: str = ".safetensors") -> None:
    """Give every item without an `out` one under out_dir: its path relative to the inputs' common
    folder (hf:// inputs: OWNER/REPO[/PATH]), so two inputs of one name in different folders never collide.

    directory: True when the command writes a folder (a PEFT directory: the suffix is dropped), False
    when it writes one file (a folder input gets `suffix`), None to keep each input's own form.
    """
    local = [os.path.abspath(i.input) for i in items if i.out is None and not i.input.startswith("hf://")]
    root = os.path.commonpath([os.path.dirname(p) for p in local]) if local else os.getcwd()
    for item in items:
        if item.out is not None:
            if not os.path.isabs(item.out):
                item.out = str(out_dir / item.out)
            continue
        if item.input.startswith("hf://"):
            rel = item.input[len("hf://"):].split("@")[0].strip("/")
            is_dir = not rel.endswith(ADAPTER_SUFFIXES)
        else:
            rel = os.path.relpath(os.path.abspath(item.input), root)
            is_dir = os.path.isdir(item.input)
        stem, ext = os.path.splitext(rel)
        if directory is True:
            rel = stem if ext.lower() in ADAPTER_SUFFIXES else rel
        elif directory is False and (is_dir or ext.lower() not in ADAPTER_SUFFIXES):
            rel = (stem if ext.lower() in ADAPTER_SUFFIXES else rel) + suffix
        elif directory is False:
            rel = stem + suffix
        item.out = str(out_dir / rel)
