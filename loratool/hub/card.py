"""The model card `push` generates: YAML front matter, summary table, provenance, usage."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import Any

from loratool.errors import HubError, LoratoolError, scrub
from loratool.hub.describe import Described
from loratool.hub.urls import _NAME
from loratool.sizes import human_size

# A Hub model id: OWNER/NAME, or a canonical NAME without owner (gpt2, bert-base-uncased).
_MODEL_ID = re.compile(rf"^(?:{_NAME}/)?{_NAME}$")


def hub_model_id(value: Any) -> str | None:
    """`value` when it can stand in a card's `base_model:` (a Hub model id), else None.

    Empty strings and local paths (what PEFT records for a model loaded from disk: `/home/me/llama`,
    `./llama`, an existing directory) are not model ids; the Hub refuses a card that names them.
    """
    if not isinstance(value, str) or not _MODEL_ID.fullmatch(value) or "--" in value or ".." in value:
        return None
    if Path(value).exists():  # a local model directory that happens to look like an id
        return None
    return value


def check_base_model(value: str) -> str:
    """--base-model: a Hub model id, or HubError."""
    if hub_model_id(value) is None or Path(value).exists():
        raise HubError(f"--base-model {value!r}: not a Hub model id",
                       hint="write the base model's Hub id, e.g. meta-llama/Llama-3.2-1B or gpt2")
    return value


def fix_front_matter(text: str, base: str | None, fallback: str | None = None) -> tuple[str, str | None]:
    """Repair a README.md's front matter the way the Hub would refuse it: a `base_model` that is
    empty, not a string, or no model id (PEFT's save_pretrained writes `base_model: ''` for a model
    loaded from disk). Returns (text, what was changed or None).

    `base` (push --base-model) is set in any case; otherwise an invalid `base_model` is replaced by
    `fallback` (the adapter's own base model id) or dropped. The body is kept byte for byte.
    """
    import yaml

    if not text.startswith("---"):
        if base is None:
            return text, None
        return f"---\nbase_model: {_yaml_str(base)}\n---\n" + text, f"added base_model {base!r}"
    end = text.find("\n---", 3)
    if end < 0:
        return text, None
    try:
        meta = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return text, None
    meta = {} if meta is None else meta
    if not isinstance(meta, dict):
        return text, None
    had = "base_model" in meta
    old = meta.get("base_model")
    valid = all(hub_model_id(v) is not None for v in (old if isinstance(old, list) else [old]))
    new = base if base is not None else (None if not had or valid else fallback)
    if new is not None and new != old:
        what = f"base_model {old!r} -> {new!r}" if had else f"added base_model {new!r}"
        meta["base_model"] = new
    elif had and not valid:
        del meta["base_model"]
        what = f"removed base_model {old!r} (not a Hub model id; --base-model ID sets one)"
    else:
        return text, None
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) if meta else ""
    return f"---\n{front}---{text[end + len(chr(10) + '---'):]}", what


def _yaml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)  # a JSON string is a valid YAML double-quoted scalar


def _counts(d: dict[str, Any], what: str = "modules") -> str:
    if len(d) <= 1:
        return ", ".join(d)
    if len(set(d.values())) == 1:
        return f"{', '.join(d)} ({next(iter(d.values()))} {what} each)"
    return ", ".join(f"{k} ({v} {what})" for k, v in d.items())


def model_card(described: Described, *, repo_id: str, files: list[tuple[str, Path]], source: Path,
               base_model: str | None = None) -> str:
    """README.md for a pushed adapter or model: YAML front matter, summary table, provenance, usage.

    base_model (push --base-model) replaces the base model the adapter records."""
    s = described.summary
    adapter = described.kind == "adapter"
    base = base_model or (s.get("base_model") if adapter else None)
    meta: dict[str, str] = dict(s.get("metadata") or {}) if adapter else _checkpoint_metadata(source)
    fmt = s.get("format") if adapter else None

    front = ["---"]
    hub_base = hub_model_id(base)
    if hub_base:  # a local path is no Hub base_model (the Hub rejects it)
        front.append(f"base_model: {_yaml_str(hub_base)}")
    if fmt == "peft":
        front.append("library_name: peft")
    front += ["tags:", "- lora", "- loratool", "---", ""]

    name = repo_id.split("/", 1)[-1]
    body = [f"# {name}", ""]
    if adapter:
        body += [f"A LoRA adapter in {fmt} format"
                 + (f" for `{base}`" if base else "") + ", published with loratool.", ""]
        ranks = s["ranks"]
        rank = (str(ranks["min"]) if ranks["min"] == ranks["max"]
                else f"{ranks['min']} to {ranks['max']} (most common {ranks['most_common']})")
        rows = [
            ("format", str(fmt)),
            ("base model", base or "not recorded"),
            ("modules", str(s["num_modules"])),
            ("rank", rank),
            ("alpha", _counts(s["alphas"]) + f"; from {', '.join(s['alpha_sources'])}"),
            ("scale", _counts(s["scales"])),
            ("targets", _counts(s["targets"])),
            ("rsLoRA / DoRA", f"{'yes' if s['rslora'] else 'no'} / {'yes' if s['dora'] else 'no'}"),
            ("dtypes", ", ".join(s["dtypes"])),
            ("LoRA parameters", f"{s['lora_params']:,}"),
        ]
    else:
        body += ["Model files published with loratool.", ""]
        rows = [(k, str(v)) for k, v in s.items() if k != "size"]
    rows.append(("files", ", ".join(f"`{rel}`" for rel, _ in files)
                 + f" ({human_size(sum(f.stat().st_size for _, f in files))})"))
    body += ["| | |", "|---|---|"] + [f"| {k} | {v.replace('|', '/')} |" for k, v in rows] + [""]

    body += _provenance(meta)
    body += _usage(fmt, repo_id, files, source, hub_model_id(base),
                   (s.get("config") or {}).get("task_type") if adapter else None)
    return scrub("\n".join(front + body).rstrip() + "\n")  # a metadata value may be the token


def _checkpoint_metadata(src: Path) -> dict[str, str]:
    """The loratool provenance of the first weights file that carries one (e.g. a merged model)."""
    from loratool.io.header import read_header
    from loratool.io.paths import leads_out

    for f in sorted(src.rglob("*.safetensors")) if src.is_dir() else [src]:
        if src.is_dir() and leads_out(f, src):
            continue  # never read through a link out of the folder
        try:
            meta = read_header(f).metadata
        except LoratoolError:
            continue
        if "loratool.op" in meta:
            return dict(meta)
    return {}


def _provenance(meta: dict[str, str]) -> list[str]:
    op = meta.get("loratool.op")
    if not op:
        return []
    out = ["## Provenance", "", f"Made by `loratool {op}`"
           + (f" (loratool {meta['loratool.version']})" if meta.get("loratool.version") else "") + "."]
    params = meta.get("loratool.params")
    if params:
        with contextlib.suppress(ValueError, RecursionError):
            params = json.dumps(json.loads(params), indent=2, sort_keys=True)
        out += ["", "Parameters:", "", "```json", params.replace("```", "'''"), "```"]
    sources = meta.get("loratool.sources")
    if sources:
        try:
            parsed = json.loads(sources)
        except (ValueError, RecursionError):
            parsed = None
        if isinstance(parsed, dict) and parsed:
            # file names only: a local absolute path says more about the uploader than about the adapter
            out += ["", "Sources (sha256):", ""]
            out += [f"- `{Path(str(k)).name}`: `{v}`" for k, v in parsed.items()]
    return [*out, ""]


_AUTO_CLASS = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
               "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM", "TOKEN_CLS": "AutoModelForTokenClassification",
               "QUESTION_ANS": "AutoModelForQuestionAnswering"}


def _usage(fmt: str | None, repo_id: str, files: list[tuple[str, Path]], source: Path, base: str | None,
           task_type: Any) -> list[str]:
    if fmt == "peft":
        auto = _AUTO_CLASS.get(str(task_type), "AutoModel")
        code = ["from peft import PeftModel", f"from transformers import {auto}", "",
                f"base = {auto}.from_pretrained({_yaml_str(base) if base else 'BASE_MODEL'})",
                f"model = PeftModel.from_pretrained(base, {_yaml_str(repo_id)})"]
    elif fmt in ("kohya", "diffusers") and source.is_file():
        code = [f"pipe.load_lora_weights({_yaml_str(repo_id)}, weight_name={_yaml_str(files[0][0])})"]
    else:
        code = []
    out = ["## Usage", ""]
    if code:
        out += ["```python", *code, "```", ""]
    out += ["```bash", f"loratool inspect hf://{repo_id}", f"loratool pull {repo_id} -o ./{repo_id.split('/')[-1]}",
            "```", ""]
    return out
