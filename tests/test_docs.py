"""The documentation stays honest (in the spirit of sqlite-utils' tests/test_docs.py).

- every command registered in `loratool.cli.cli` has a page docs/commands/<name>.md, an entry in
  docs/cli.md, a mention in README.md, and a --help that ends with an `Example:` line;
- every option of a command is named on its page;
- every command with `--json` is run (_json_examples; pull and push against the local Hub server
  of tests/hub/), every key its document emits is listed in its section of docs/json.md, a key
  has one JSON type across all commands, and every document but validate's has a `warnings` list;
- every validate finding code in the source is explained in docs/commands/validate.md;
- (slow) every command line in the ```console / ```bash blocks of README.md, docs/commands/*.md,
  docs/cli.md and docs/formats.md that touches only fixtures/ and /tmp runs, in order, and prints
  what the page shows (names, words and integers exactly, other numbers to RTOL with float32
  rounding noise below NOISE equal to 0, whitespace runs equal, a `...` line stands for any lines;
  Error:, Hint: and Warning: lines are looked for on stderr), with exit code 0 unless the page
  shows an Error: line.

A command added later therefore needs its page, its options and its JSON keys documented: that is
the point.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from clirun import run_cli

from loratool.cli import cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
FIXTURES = ROOT / "fixtures"
COMMANDS = sorted(cli.commands)

# adapter fixture -> its base (fixtures/README.md)
PAIRS = {
    "peft_llama": "base_llama",
    "peft_dora": "base_llama",
    "peft_gpt2": "base_gpt2",
    "peft_cls": "base_cls",
    "kohya_sd.safetensors": "base_sd.safetensors",
    "diffusers_sd.safetensors": "base_unet",
    "diffusers_legacy.safetensors": "base_unet",
}

# JSON objects whose keys are data (metadata entries, config fields, alpha values, short module
# names, ...), not schema: their keys are not looked up in docs/json.md
FREE_FORM = {"metadata", "config", "alphas", "alpha_sources", "scales", "targets", "kinds", "dtypes", "dora_axes",
             "verdicts"}

# documents that embed another command's document (pull's `summary` is inspect's)
REFERS = {"pull": ("inspect",)}

PLACEHOLDER = re.compile(r"<!--[^>]*\bfills? in\b[^>]*-->")


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _page(name: str) -> Path:
    return DOCS / "commands" / f"{name}.md"


def _mentions(text: str, word: str) -> bool:
    """`word` (an option like --rank) appears as a whole token."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


# ---------------------------------------------------------------------------------------------
# every command documented


def test_commands_are_registered():
    assert {"inspect", "validate", "resize", "rescale"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_command_has_a_page(name):
    assert _page(name).is_file(), f"loratool {name} has no docs/commands/{name}.md"


@pytest.mark.parametrize("name", COMMANDS)
def test_command_is_listed_in_cli_md(name):
    assert f"commands/{name}.md" in _text(DOCS / "cli.md"), f"docs/cli.md does not link commands/{name}.md"


@pytest.mark.parametrize("name", COMMANDS)
def test_command_is_in_readme(name):
    assert re.search(rf"\bloratool {name}\b", _text(README)), f"README.md never mentions `loratool {name}`"


@pytest.mark.parametrize("name", [None, *COMMANDS])
def test_help_ends_with_an_example(name):
    args = [name, "--help"] if name else ["--help"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert re.search(r"^\s*Example: loratool ", r.output, re.M), f"`loratool {' '.join(args)}` has no Example: line"


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_is_on_the_command_page(name):
    page = _page(name)
    if not page.is_file():
        pytest.fail(f"docs/commands/{name}.md is missing")
    text = _text(page)
    missing = []
    for param in cli.commands[name].params:
        if not isinstance(param, click.Option):
            continue
        names = [*param.opts, *param.secondary_opts]
        wanted = [o for o in names if o.startswith("--")] or names
        if not any(_mentions(text, o) for o in wanted):
            missing.append("/".join(names))
    assert not missing, f"docs/commands/{name}.md does not mention: {', '.join(missing)}"


# ---------------------------------------------------------------------------------------------
# --json keys documented


def _json_sections() -> dict[str, str]:
    """docs/json.md split at its `## ` headings: first word of the heading -> section text."""
    sections: dict[str, str] = {}
    current = None
    for line in _text(DOCS / "json.md").splitlines():
        if line.startswith("## "):
            current = line[3:].split()[0].strip("`")
            sections[current] = ""
        elif current is not None:
            sections[current] += line + "\n"
    return sections


def _keys(doc: Any, out: set[str]) -> set[str]:
    if isinstance(doc, dict):
        for k, v in doc.items():
            out.add(k)
            if k not in FREE_FORM:
                _keys(v, out)
    elif isinstance(doc, list):
        for v in doc:
            _keys(v, out)
    return out


def _documented(section: str, key: str) -> bool:
    # `key`, or a path ending in it: `modules[].key`, `ranks.key`
    return re.search(rf"`(?:[\w\[\]]+\.)*{re.escape(key)}`", section) is not None


def _run_json(args: list[str], env: dict[str, str | None] | None = None) -> dict[str, Any]:
    r = run_cli([*args, "--json"], env=env)
    assert r.code in (0, 1), (args, r.code, r.err)
    return json.loads(r.out)


def _broken_copy(tmp: Path) -> Path:
    """peft_llama with a rank_pattern that lies, a NaN, and one module without each factor."""
    from safetensors.torch import load_file, save_file

    out = tmp / "broken_llama"
    shutil.copytree(FIXTURES / "peft_llama", out)
    cfg = json.loads(_text(out / "adapter_config.json"))
    cfg["rank_pattern"]["q_proj"] = 16
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    weights = out / "adapter_model.safetensors"
    t = load_file(weights)
    t["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"][0, 0] = float("nan")
    del t["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"]
    del t["base_model.model.model.layers.1.mlp.gate_proj.lora_A.weight"]
    save_file(t, weights)
    return out


def _pickle_copy(tmp: Path) -> Path:
    """A torch.save pickle, so that scan's document has its pickle keys."""
    import torch

    out = tmp / "pickled.bin"
    torch.save({"base_model.model.x.lora_A.weight": torch.zeros(2, 4)}, out)
    return out


def _json_examples(tmp: Path, hub_url: str) -> dict[str, list[list[str]]]:
    """Every command with --json, run on the fixtures so that its document has all its keys."""
    f = {name: str(FIXTURES / name) for name in (*PAIRS, *PAIRS.values())}
    kohya, llama = f["kohya_sd.safetensors"], f["peft_llama"]
    ex: dict[str, list[list[str]]] = {"inspect": [], "validate": []}
    for adapter, base in PAIRS.items():
        ex["inspect"] += [["inspect", f[adapter], "--spectrum", "--device", "cpu"], ["inspect", f[adapter]]]
        ex["validate"] += [["validate", f[adapter], "--base", f[base]], ["validate", f[adapter]]]
    ex["validate"].append(["validate", str(_broken_copy(tmp))])
    ex["resize"] = [["resize", f["peft_dora"], "-o", str(tmp / "r1"), "--rank", "2"],
                    ["resize", kohya, "-o", str(tmp / "r2.safetensors"), "--method", "sv_fro", "--threshold", "0.9",
                     "--modules", "unet", "--device", "cpu"]]
    ex["rescale"] = [["rescale", llama, "-o", str(tmp / "s1"), "--factor", "0.5", "--modules", "q_proj"],
                     ["rescale", kohya, "-o", str(tmp / "s2.safetensors"), "--normalize"]]
    ex["merge"] = [["merge", f["base_llama"], llama, "-o", str(tmp / "m1"), "--weights", "0.5"],
                   ["merge", f["base_sd.safetensors"], kohya, "-o", str(tmp / "m2.safetensors")]]
    ex["combine"] = [["combine", llama, llama, "-o", str(tmp / "c1"), "--weights", "0.5,0.5",
                      "--method", "svd", "--rank", "4"],
                     ["combine", kohya, kohya, "-o", str(tmp / "c2.safetensors"), "--weights", "1,-0.5",
                      "--method", "dare_ties", "--density", "0.5", "--seed", "1"]]
    ex["extract"] = [["extract", f["base_llama"], str(tmp / "m1"), "-o", str(tmp / "e1"), "--rank", "4"]]
    ex["convert"] = [["convert", llama, "--to", "kohya", "-o", str(tmp / "k1.safetensors")],
                     ["convert", kohya, "--to", "peft", "-o", str(tmp / "p1")]]
    ex["verify"] = [["verify", str(tmp / "m1"), "--base", f["base_llama"], llama, "--weights", "0.5"],
                    ["verify", f["base_llama"], "--base", f["base_llama"], llama, "--all"]]
    ex["diff"] = [["diff", llama, str(tmp / "r1"), "--all"], ["diff", kohya, str(tmp / "r2.safetensors")]]
    ex["scan"] = [["scan", kohya], ["scan", llama], ["scan", str(_pickle_copy(tmp))]]
    ex["push"] = [["push", llama, "alice/json-lora"]]
    ex["pull"] = [["pull", "alice/json-lora"], ["pull", "alice/json-base"]]
    return ex


@pytest.fixture(scope="module")
def json_documents(tmp_path_factory) -> dict[str, list[dict[str, Any]]]:
    """The --json documents of every command (_json_examples), pull and push against the local Hub server."""
    from hub.hubserver import HubServer

    tmp = tmp_path_factory.mktemp("json_docs")
    token = "hf_docsTestToken0123456789abcdef"
    with HubServer(users={token: "alice"}) as hub:
        files = {p.relative_to(FIXTURES / "base_llama").as_posix(): p.read_bytes()
                 for p in (FIXTURES / "base_llama").rglob("*") if p.is_file()}
        hub.add_repo("alice/json-base", files)
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp / "hf_home"), "HF_TOKEN": token, "HF_HUB_OFFLINE": None}
        docs: dict[str, list[dict[str, Any]]] = {}
        for name, runs in _json_examples(tmp, hub.url).items():
            docs[name] = [_run_json(args, env) for args in runs]
    return docs


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "str", list: "list", dict: "object"}.get(type(value), type(value).__name__)


def _key_types(doc: Any, where: str, out: dict[str, dict[str, str]]) -> None:
    """key -> {JSON type -> first place seen}; null goes with any type."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            # inspect's `family` object names the family in its own `family` (and candidates'): a
            # string field of that object (docs/json.md's family row), not the object's key reused
            own = k == "family" and where.endswith((".family", ".family.candidates[]"))
            if v is not None and not own:
                out.setdefault(k, {}).setdefault(_json_type(v), f"{where}.{k}")
            if k not in FREE_FORM:
                _key_types(v, f"{where}.{k}", out)
    elif isinstance(doc, list):
        for v in doc:
            _key_types(v, f"{where}[]", out)


@pytest.mark.parametrize("name", COMMANDS)
def test_json_keys_are_documented(name, json_documents):
    if not any(isinstance(p, click.Option) and "--json" in p.opts for p in cli.commands[name].params):
        pytest.skip(f"{name} has no --json")
    assert json_documents.get(name), f"loratool {name} has --json but no example in _json_examples"
    sections = _json_sections()
    assert name in sections, f"docs/json.md has no `## {name}` section"
    keys: set[str] = set()
    for doc in json_documents[name]:
        assert doc.get("schema") == 1
        _keys(doc, keys)
    # pull's `summary` is the inspect document (docs/json.md says so): its keys are listed under inspect
    text = sections[name] + "".join(sections.get(other, "") for other in REFERS.get(name, ()))
    missing = sorted(k for k in keys if not _documented(text, k))
    assert not missing, f"docs/json.md `## {name}` does not list: {', '.join(missing)}"


def test_json_keys_have_one_type_across_commands(json_documents):
    types: dict[str, dict[str, str]] = {}
    for name, docs in json_documents.items():
        for doc in docs:
            _key_types(doc, name, types)
    mixed = {k: v for k, v in types.items() if len(v) > 1}
    assert not mixed, "keys with more than one JSON type: " + "; ".join(
        f"{k}: " + ", ".join(f"{t} at {w}" for t, w in v.items()) for k, v in sorted(mixed.items()))


def test_every_document_but_validate_has_a_warnings_list(json_documents):
    for name, docs in json_documents.items():
        for doc in docs:
            if name != "validate":
                assert isinstance(doc.get("warnings"), list), (name, doc.get("warnings"))
            else:
                assert "warnings" not in doc and isinstance(doc["num_warnings"], int)


@pytest.mark.parametrize("name", COMMANDS)
def test_json_commands_have_a_section(name):
    if not any(isinstance(p, click.Option) and "--json" in p.opts for p in cli.commands[name].params):
        pytest.skip(f"{name} has no --json")
    assert name in _json_sections(), f"loratool {name} has --json but docs/json.md has no `## {name}` section"


# ---------------------------------------------------------------------------------------------
# validate finding codes documented

_CODE = re.compile(r"^[a-z][a-z0-9]*(?:-[a-z0-9]+)+$")


def _source_codes() -> tuple[set[str], list[re.Pattern[str]]]:
    """Finding codes in loratool's source: literal codes, and f-string codes as patterns."""
    literal: set[str] = set()
    patterns: list[re.Pattern[str]] = []
    for path in (ROOT / "loratool").rglob("*.py"):
        tree = ast.parse(_text(path))
        assigned: dict[str, set[str]] = {}  # name -> every string constant ever assigned to it
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                consts = {c.value for c in ast.walk(node.value)
                          if isinstance(c, ast.Constant) and isinstance(c.value, str)}
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        assigned.setdefault(target.id, set()).update(consts)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in ("error", "warning") and node.args:
                arg = node.args[0]
            elif isinstance(func, ast.Name) and func.id == "Finding" and len(node.args) > 1:
                arg = node.args[1]
            else:
                continue
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                literal.add(arg.value)
            elif isinstance(arg, ast.Name):
                literal.update(assigned.get(arg.id, set()))
            elif isinstance(arg, ast.JoinedStr):
                parts = [re.escape(v.value) if isinstance(v, ast.Constant) else "[a-z]+" for v in arg.values]
                patterns.append(re.compile("".join(parts)))
    return {c for c in literal if _CODE.match(c)}, patterns


def test_every_finding_code_is_documented(json_documents):
    page = _text(_page("validate"))
    documented = set(re.findall(r"`([a-z][a-z0-9]*(?:-[a-z0-9]+)+)`", page))
    literal, patterns = _source_codes()
    emitted = {f["code"] for doc in json_documents["validate"] for f in doc["findings"]}
    assert {"non-finite", "config-rank-mismatch", "missing-up", "missing-down", "alpha-missing"} <= emitted
    missing = sorted((literal | emitted) - documented)
    assert not missing, f"docs/commands/validate.md does not explain: {', '.join(missing)}"
    for p in patterns:
        assert any(p.fullmatch(c) for c in documented), f"no documented code matches the f-string code {p.pattern}"


# ---------------------------------------------------------------------------------------------
# the README's commands run


def _split_and(command: str) -> list[str]:
    """Split a shell line at top-level `&&` (outside quotes)."""
    parts, buf, quote, i = [], "", None, 0
    while i < len(command):
        ch = command[i]
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif command.startswith("&&", i):
            parts.append(buf)
            buf, i = "", i + 2
            continue
        buf += ch
        i += 1
    parts.append(buf)
    return [" ".join(p.split()) for p in parts if p.strip()]


def readme_commands(text: str) -> list[tuple[str, str, bool]]:
    """(command, output shown under it, followed by a placeholder) for every command in a
    ```console block (`$ ` lines) or ```bash block (every line, `&&` chains split), in order."""
    events: list[list[Any]] = []  # [command, shown output, placeholder after it]
    block = None
    pending = ""  # a command continued with a trailing backslash
    for line in text.splitlines():
        fence = re.match(r"^```(\w*)\s*$", line)
        if fence:
            block = None if block is not None else fence.group(1)
            continue
        if PLACEHOLDER.search(line):
            if events:
                events[-1][2] = True
            continue
        if block not in ("console", "bash"):
            continue
        if block == "console" and not pending:
            if not line.startswith("$ "):
                if events:
                    events[-1][1] += line + "\n"
                continue
            line = line[2:]
        if block == "bash" and not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        for cmd in _split_and(pending + line):
            events.append([cmd, "", False])
        pending = ""
    return [(c, out, ph) for c, out, ph in events]


# How documented numbers compare with printed ones. Float results depend on the CPU, the maths
# library and the thread count (summation order), so a page promises them only to these bounds:
# - integers (counts, ranks, sizes in bytes, exit codes) compare exactly;
# - a number written with a point or an exponent compares within RTOL (relative to the larger);
# - numbers of magnitude below NOISE compare equal to each other and to 0: they are float32
#   rounding noise (`rel. error` of an exact operation is 0 on one machine and 2.6e-08 on another).
# docs/cli.md ("Output conventions") states these rules for readers of the pages.
RTOL = 0.01
NOISE = 1e-6
_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?!\w|\.\d)")


def _tokens(text: str) -> list[str]:
    """Whitespace-separated words, each split into numbers and the text between them."""
    out: list[str] = []
    for word in text.split():
        pos = 0
        for m in _NUMBER.finditer(word):
            if m.start() > pos:
                out.append(word[pos:m.start()])
            out.append(m.group())
            pos = m.end()
        if pos < len(word):
            out.append(word[pos:])
    return out


def _same_token(doc: str, got: str) -> bool:
    if doc == got:
        return True
    if not (_NUMBER.fullmatch(doc) and _NUMBER.fullmatch(got)):
        return False
    if not any(c in doc + got for c in ".eE"):
        return False  # two integers: exact
    a, b = float(doc), float(got)
    big = max(abs(a), abs(b))
    return big < NOISE or abs(a - b) <= RTOL * big


def _match_at(needle: list[str], hay: list[str], at: int) -> bool:
    return at + len(needle) <= len(hay) and all(_same_token(n, h) for n, h in zip(needle, hay[at:at + len(needle)]))


def _find(needle: list[str], hay: list[str], start: int = 0) -> int:
    for at in range(start, len(hay) - len(needle) + 1):
        if _match_at(needle, hay, at):
            return at
    return -1


def _contains(shown: str, printed: str) -> bool:
    """Whether one documented line appears in the printed text (numbers as in _shows)."""
    return _find(_tokens(shown), _tokens(printed)) >= 0


def _shows(shown: str, printed: str) -> bool:
    """Whether a documented output is what the command printed. Names, words and integers compare
    exactly, floats to RTOL with noise below NOISE ignored; whitespace runs compare equal (a table
    wraps differently when the paths differ in length); a `...` line stands for any lines."""
    segments = [_tokens(s) for s in re.split(r"^\s*\.\.\.,?\s*$", shown, flags=re.M)]
    text = _tokens(printed)
    if len(segments) == 1:
        return len(text) == len(segments[0]) and _match_at(segments[0], text, 0)
    first, last = segments[0], segments[-1]
    if not (_match_at(first, text, 0) and _match_at(last, text, len(text) - len(last))):
        return False
    pos = len(first)
    for seg in segments[1:-1]:
        found = _find(seg, text, pos)
        if found < 0:
            return False
        pos = found + len(seg)
    return pos <= len(text) - len(last)


@pytest.mark.parametrize(("shown", "printed"), [
    ("q_proj 4 + 2 4 100.00% 2.67e-08", "q_proj  4 + 2  4  100.00%  2.64e-08"),  # noise digits
    ("rel. error 0", "rel. error 2.19e-08"),  # exact on one machine, rounding noise on another
    ("kept 95.86% 0.285", "kept 95.87% 0.2852"),  # last printed digit
    ("max cast error 6.1e-05, 79.9 KB)", "max cast error 6.09e-05, 79.9 KB)"),
    ("Wrote /tmp/x (14 modules, rank 2..8 -> 2, 12.8 KB)", "Wrote /tmp/x (14 modules, rank 2..8 -> 2, 12.8 KB)"),
    ("a\n...\nz 0.5", "a\nb\nc\nz 0.501"),
    ('"rel_error": 3.17e-08,', '"rel_error": 2.9e-08,'),
])
def test_shows_accepts_rounding_noise(shown, printed):
    assert _shows(shown, printed)


@pytest.mark.parametrize(("shown", "printed"), [
    ("14 modules, rank 4", "14 modules, rank 5"),  # integers are exact
    ("14 modules", "15 modules"),
    ("kept 95.86%", "kept 93.00%"),  # beyond RTOL
    ("rel. error 0.285", "rel. error 2.1e-08"),  # a real error is not noise
    ("model.layers.0.mlp", "model.layers.1.mlp"),  # names are exact
    ("torch 2.13.0", "torch 2.13.1"),
    ("a\n...\nz", "a\nb"),
    ("a b", "a b c"),
])
def test_shows_rejects_real_differences(shown, printed):
    assert not _shows(shown, printed)


def test_contains_compares_numbers_the_same_way():
    assert _contains("Warning: error 2.67e-08 in q_proj", "x\nWarning: error 2.7e-08 in q_proj\ny")
    assert not _contains("Warning: 3 modules", "Warning: 4 modules")


def _runnable(command: str) -> bool:
    """Documentation examples to run: no installs, no test runs, only fixtures/ and /tmp paths."""
    words = command.split()
    if not words or words[0] in ("pip", "echo", ".", "source") or "pytest" in words or "hf://" in command \
            or "your-name" in command or "venv" in words:
        return False
    if "LORATOOL_DEBUG" in command:  # tracebacks: line numbers change with every edit
        return False
    try:
        tokens = shlex.split(command)
    except ValueError:
        return False
    for tok in tokens:
        tok = tok.rstrip(";|&")
        is_path = "/" in tok and not re.search(r"\s", tok) and not tok.startswith("-")
        if is_path and not tok.startswith(("fixtures/", "/tmp/")):
            return False
    return True


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)


def test_readme_python_examples_run(tmp_path):
    """The README's Python API example runs as shown (fixtures/ and /tmp paths, like the console examples)."""
    blocks = _python_blocks(_text(README))
    assert blocks, "README.md has no ```python example"
    work = _workdir(tmp_path)
    for code in blocks:
        code = code.replace("/tmp/", f"{tmp_path}/")
        r = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert r.returncode == 0, f"{code}\n{r.stderr}"
        assert "Traceback" not in r.stderr


def test_readme_commands_are_found():
    cmds = [c for c, _, _ in readme_commands(_text(README))]
    assert "loratool inspect fixtures/peft_llama" in cmds
    assert "pip install torch==2.13.0" in cmds
    merge = "loratool merge fixtures/base_llama fixtures/peft_llama -o /tmp/merged --force"
    assert merge in cmds


STDERR_LINE = re.compile(r"^(Error|Hint|Warning): ")
# the pages whose console examples are run; the Hub pages' examples need the test Hub (tests/hub/)
DOC_PAGES = [README, *sorted((DOCS / "commands").glob("*.md")), DOCS / "cli.md", DOCS / "formats.md",
             DOCS / "troubleshooting.md"]


def _workdir(tmp_path: Path) -> Path:
    """A working directory where `fixtures/X` and, as some pages write it, plain `X` both name a fixture."""
    work = tmp_path / "work"
    if work.exists():
        return work
    work.mkdir()
    (work / "fixtures").symlink_to(FIXTURES)
    for entry in FIXTURES.iterdir():
        (work / entry.name).symlink_to(entry)
    return work


def _doc_failures(page: Path, tmp_path: Path) -> tuple[list[str], set[str]]:
    """Run a page's example commands in order; (what disagrees with the page, commands run)."""
    events = readme_commands(_text(page))
    skipped = {c for c, _, placeholder in events if placeholder}
    shown: dict[str, list[str]] = {}
    order: list[str] = []
    for cmd, out, _ in events:
        if cmd not in shown:
            order.append(cmd)
            shown[cmd] = []
        if out:
            shown[cmd].append(out)
    env = {k: v for k, v in os.environ.items() if k not in ("LORATOOL_DEBUG", "COLUMNS")}
    py = shlex.quote(sys.executable)
    work = _workdir(tmp_path)
    ran: set[str] = set()
    failures = []

    def local(text: str) -> str:
        return "\n".join(line.rstrip() for line in text.replace(f"{tmp_path}/", "/tmp/").splitlines())

    for cmd in order:
        if cmd in skipped or not _runnable(cmd):
            continue
        line = cmd.replace("/tmp/", f"{tmp_path}/")
        line = re.sub(r"(^|[;|]\s*)loratool\b", rf"\g<1>{py} -m loratool", line)
        line = re.sub(r"(^|[;|]\s*)python\b", rf"\g<1>{py}", line)
        r = subprocess.run(["bash", "-c", line], cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=600)  # no terminal: the tables are 160 wide, as the pages show
        documented = shown[cmd]
        expects_error = any(x.startswith("Error: ") for d in documented for x in d.splitlines())
        if r.returncode != 0 and not (expects_error and r.returncode in (1, 2)):
            failures.append(f"$ {cmd}\nexit {r.returncode}\n{(r.stdout + r.stderr)[-2000:]}")
            continue
        want = re.findall(r"^exit code \d+$", documented[0] if documented else "", re.M)
        got = re.findall(r"^exit code \d+$", r.stdout, re.M)
        if want != got:
            failures.append(f"$ {cmd}\nthe page shows {want} but the command printed {got}")
        for doc in documented:
            out_part = "\n".join(x for x in doc.splitlines() if not STDERR_LINE.match(x))
            err_part = [x for x in doc.splitlines() if STDERR_LINE.match(x)]
            stdout, stderr = local(r.stdout), " ".join(local(r.stderr).split())
            if not _shows(out_part, stdout):
                failures.append(f"$ {cmd}\nthe page shows:\n{out_part}\nbut the command printed:\n{stdout}")
            for err in err_part:
                if not _contains(err, stderr):
                    failures.append(f"$ {cmd}\nthe page shows on stderr:\n{err}\nbut stderr was:\n{local(r.stderr)}")
        if cmd.startswith("loratool "):
            ran.add(cmd.split()[1])
    return failures, ran


@pytest.fixture(scope="module")
def after_readme(tmp_path_factory):
    """One /tmp for every page, as a reader has it: the README's examples first (their outputs,
    like /tmp/merged, are inputs of other pages), then each page in turn."""
    tmp = tmp_path_factory.mktemp("docs")
    return tmp, _doc_failures(README, tmp)


@pytest.mark.slow
@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_commands_print_what_the_page_shows(page, after_readme):
    tmp, readme_result = after_readme
    failures, ran = readme_result if page == README else _doc_failures(page, tmp)
    assert not failures, "\n\n".join(failures)
    if page == README:
        want_ran = {"inspect", "validate", "resize", "rescale", "merge", "combine", "extract", "convert"}
        assert want_ran <= ran, f"only ran: {sorted(ran)}"
    elif page.parent.name == "commands" and page.stem not in ("pull", "push"):
        assert page.stem in ran, f"{page.name}: no example of the command itself was run"


# ---------------------------------------------------------------------------------------------
# installing, the first problems, and the help texts (issue 29, item 10)

ALL_DOCS = [README, *sorted(DOCS.rglob("*.md"))]


def test_install_and_troubleshooting_pages_exist_and_are_linked():
    readme = _text(README)
    for page in ("docs/install.md", "docs/troubleshooting.md"):
        assert (ROOT / page).is_file(), page
        assert f"]({page})" in readme, f"README.md does not link {page}"
    trouble = _text(DOCS / "troubleshooting.md")
    for topic in ("too strong or too weak", "share no module", "key not loaded", "unmatched module(s)"):
        assert topic in trouble, topic


def test_no_page_installs_loratool_from_the_package_index():
    """loratool is not on PyPI: `pip install loratool` / `pip install 'loratool[gguf]'` would fail
    or install someone else's package; installs go through a clone or a git URL (docs/install.md)."""
    from_index = re.compile(r"""pip install\s+['"]?loratool(?:\[[\w,]+\])?(?![\[\w-])(?!['"]?\s*@)""")
    bad = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in ALL_DOCS for m in from_index.finditer(_text(p))]
    assert not bad, bad
    install = _text(DOCS / "install.md")
    assert "git+" in install and 'pip install -e "."' not in install and "pip install -e ." in install


def test_the_extras_install_md_names_are_the_packages():
    import tomllib

    extras = set(tomllib.loads(_text(ROOT / "pyproject.toml"))["project"]["optional-dependencies"])
    named = set(re.findall(r"^\| `(\w+)` \|", _text(DOCS / "install.md"), re.M))
    assert named == extras, (named, extras)
    for extra in extras:
        assert f'pip install -e ".[{extra}]"' in _text(DOCS / "install.md"), extra


def test_readme_says_how_long_the_suite_takes_and_how_to_skip_the_slow_tests():
    import tomllib

    readme = " ".join(_text(README).split())
    assert "about 12 minutes" in readme and "-m \"not slow\"" in readme
    markers = tomllib.loads(_text(ROOT / "pyproject.toml"))["tool"]["pytest"]["ini_options"]["markers"]
    assert any(m.startswith("slow:") for m in markers)
    assert "placeholder" not in readme.lower()


def test_venv_is_ignored():
    assert ".venv/" in _text(ROOT / ".gitignore").split()


def test_help_texts_name_every_format():
    from loratool.formats import all_formats, writable_formats

    top = " ".join(CliRunner().invoke(cli, ["--help"]).output.split())
    for f in all_formats():
        assert f.name in top, f"loratool --help does not name {f.name}"
    convert = " ".join(CliRunner().invoke(cli, ["convert", "--help"]).output.split())
    resize_format = next(line for line in _text(_page("resize")).splitlines() if line.startswith("| `--format`"))
    for name in writable_formats():
        assert name in convert, f"convert --help does not name {name}"
        assert f"`{name}`" in resize_format, f"docs/commands/resize.md --format does not name {name}"
    assert "between PEFT, kohya and diffusers" not in convert
