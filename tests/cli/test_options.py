"""One option name, one meaning: walk every command's click options (issue: `-m` was --method in
combine and --message in push, `inspect --modules` a flag and a regex elsewhere, --weights required
in one command and optional in the other, ...)."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import click
import pytest
from clirun import run_cli

from loratool.cli import cli

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures"

# Where `required` differs on purpose: pull copies to -o only when asked (the cache is the output);
# verify compares against the base, so it cannot do without one.
REQUIRED_MAY_DIFFER = {("--out", "pull"), ("-o", "pull"), ("--base", "verify")}


def _kind(p: click.Option) -> str:
    if p.is_flag:
        return "flag"
    if getattr(p, "_flag_needs_value", False):  # --opt [VALUE]
        return "value"
    t = p.type
    if isinstance(t, click.Choice):
        return "choice"
    if isinstance(t, click.Path):
        return "path"
    if isinstance(t, click.types.IntParamType):  # IntRange too
        return "int"
    if isinstance(t, click.types.FloatParamType):
        return "float"
    return "value"


def _options() -> dict[str, list[tuple[str, click.Option]]]:
    uses: dict[str, list[tuple[str, click.Option]]] = defaultdict(list)
    for name, cmd in sorted(cli.commands.items()):
        for p in cmd.params:
            if isinstance(p, click.Option) and not p.hidden:
                for o in (*p.opts, *p.secondary_opts):
                    if o not in ("-h", "--help"):
                        uses[o].append((name, p))
    return uses


def test_each_name_has_one_kind_and_one_spelling():
    problems = []
    for opt, uses in _options().items():
        kinds = {(_kind(p), p.multiple, p.nargs) for _, p in uses}
        if len(kinds) > 1:
            problems.append(f"{opt}: " + ", ".join(f"{c}={_kind(p)}" for c, p in uses))
        # a short name stands for the same long name everywhere, and vice versa
        longs = {tuple(sorted(o for o in (*p.opts, *p.secondary_opts) if o.startswith("--"))) for _, p in uses}
        shorts = {tuple(sorted(o for o in p.opts if not o.startswith("--"))) for _, p in uses}
        if len(longs) > 1 or len(shorts) > 1:
            problems.append(f"{opt}: spelled " + " / ".join(sorted({"|".join(p.opts) for _, p in uses})))
        required = {p.required for c, p in uses if (opt, c) not in REQUIRED_MAY_DIFFER}
        if len(required) > 1:
            problems.append(f"{opt}: required in " + ", ".join(c for c, p in uses if p.required) + " only")
        dests = {p.name for _, p in uses}
        if len(dests) > 1:
            problems.append(f"{opt}: bound to different parameters {sorted(dests)}")
    assert not problems, "one option name, several meanings:\n" + "\n".join(problems)


def test_shared_options_are_in_the_cli_md_table():
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    table = text[text.index("## Shared options"):text.index("## Output conventions")]
    missing = [opt for opt, uses in _options().items()
               if opt.startswith("--") and len({c for c, _ in uses}) > 1
               and not re.search(rf"`[^`]*{re.escape(opt)}\b", table)]
    assert not missing, f"docs/cli.md 'Shared options' does not explain: {missing}"


def test_combine_weights_default_to_one_each_like_merge(tmp_path):
    llama = str(FIXTURES / "peft_llama")
    r = run_cli(["combine", llama, llama, "-o", tmp_path / "c", "--json"])
    assert r.code == 0, r.err
    import json

    doc = json.loads(r.out)
    assert doc["weights"] == [1.0, 1.0] and doc["method"] == "cat"


@pytest.mark.parametrize("command", ["combine", "merge"])
def test_space_separated_weights_are_refused(command, tmp_path):
    llama, base = str(FIXTURES / "peft_llama"), str(FIXTURES / "base_llama")
    inputs = [llama, llama] if command == "combine" else [base, llama, llama]
    r = run_cli([command, *inputs, "-o", tmp_path / "o", "--weights", "0.5", "0.5"])
    assert r.code == 2, r.err
    assert "'0.5'" in r.err and "--weights 0.5,0.5" in r.err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args", [
    ["resize", str(FIXTURES / "peft_llama"), "--rank", "2", "-o", "hf://alice/x"],
    ["pull", "alice/x", "-o", "hf://alice/y"],
])
def test_hub_outputs_are_refused_with_the_way_to_get_there(args):
    r = run_cli(args)
    assert r.code == 2
    assert "outputs are written locally" in r.err and "loratool push" in r.err
    assert "parent directory" not in r.err


def test_inspect_modules_takes_an_optional_regex():
    llama = str(FIXTURES / "peft_llama")
    every = run_cli(["inspect", llama, "--modules"])
    some = run_cli(["inspect", llama, "--modules", r"layers\.1\..*q_proj"])
    assert every.code == some.code == 0
    rows = [line for line in some.out.splitlines() if line.startswith("model.layers")]
    assert rows and all("layers.1." in r and "q_proj" in r for r in rows)
    assert sum(line.startswith("model.layers") for line in every.out.splitlines()) == 14
    bad = run_cli(["inspect", llama, "--modules", "("])
    assert bad.code == 2 and "--modules '('" in bad.err


def test_combine_no_longer_reads_m_as_method(tmp_path):
    llama = str(FIXTURES / "peft_llama")
    r = run_cli(["combine", llama, llama, "-o", tmp_path / "c", "-m", "svd"])
    assert r.code == 2 and "-m" in r.err
