"""Outputs never land on what a command reads, locks are never trusted, --force replaces only our own
folders, outputs have the shape asked for, and signals at start-up and shutdown say the truth
(issue 22 items 1, 2, 3, 11, 12).

Every case builds its world under tmp_path, snapshots it (sha256 of every file, link targets, special
files: test_safety.snapshot), runs one command within a wall-clock bound (clirun.bounded, or a
subprocess timeout) and checks that nothing outside -o changed (for a refusal: nothing at all).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import click
import pytest
import torch
from clirun import bounded
from factories import build_adapter, build_base
from test_safety import (
    BOUND,
    MODULES,
    SHAPES,
    Case,
    check_case,
    error_lines,
    peft,
    registry,
    run,
    sharded_base,
    snapshot,
)

REPO = Path(__file__).resolve().parents[1]

CASES: dict[str, Callable[[Path], Case]] = {}
case = registry(CASES)


def tuned(w: Path, base: Path, adapter: Path) -> Path:
    """A fine-tuned model for extract: the base with the adapter merged in."""
    from loratool.ops.merge import merge

    merge(base, [adapter], w / "tuned")
    return w / "tuned"


def dora(w: Path, name: str = "dora") -> Path:
    """A PEFT DoRA adapter on MODULES (magnitudes of one per output row)."""
    extra = {f"base_model.model.{m}.lora_magnitude_vector": torch.rand(shape[0]) + 0.5 for m, shape in MODULES.items()}
    return build_adapter(w, fmt="peft", modules=MODULES, name=name, extra_tensors=extra,
                         config={"use_dora": True})


# ---------------------------------------------------------------------------------------------
# 1. every path a command reads is an input: no output is, holds or lies inside one

INSIDE = r"is inside an input of this command"

# (command, parameter) -> a case writing inside (or onto) that input; test_every_path_parameter_is_covered
# fails when a command gains a path parameter without a case here
COVERED: dict[tuple[str, str], str] = {
    ("convert", "path"): "convert-output-inside-adapter",
    ("convert", "base"): "convert-base-shard-force",
    ("convert", "dora_base"): "convert-dora-to-lora-base-inside",
    ("convert", "initial_adapter"): "convert-output-inside-initial-adapter",
    ("merge", "base"): "merge-output-inside-base",
    ("merge", "adapters"): "merge-output-inside-adapter",
    ("rescale", "path"): "rescale-output-inside-adapter",
    ("resize", "path"): "resize-output-inside-adapter",
    ("combine", "adapters"): "combine-output-inside-second-adapter",
    ("extract", "base"): "extract-output-inside-base",
    ("extract", "tuned"): "extract-output-inside-tuned",
}


@case
def case_convert_base_shard_force(w: Path) -> Case:
    base = sharded_base(w, "bl")
    return Case(["convert", peft(w), "--to", "kohya", "--base", base, "-o", base / "model-00001-of-00002.safetensors",
                 "--force"], 2, INSIDE)


@case
def case_convert_base_config_force(w: Path) -> Case:
    base = sharded_base(w, "bl")
    return Case(["convert", peft(w), "--to", "kohya", "--base", base, "-o", base / "config.json", "--force"], 2, INSIDE)


@case
def case_convert_base_new_file(w: Path) -> Case:
    base = sharded_base(w, "bl")
    return Case(["convert", peft(w), "--to", "kohya", "--base", base, "-o", base / "new.safetensors"], 2, INSIDE)


@case
def case_convert_single_file_base_force(w: Path) -> Case:
    base = build_base(w, SHAPES, layout="file", name="bl")
    return Case(["convert", peft(w), "--to", "kohya", "--base", base, "-o", base, "--force"], 2,
                r"is an input of this command")


@case
def case_convert_base_beside_is_fine(w: Path) -> Case:
    """A file next to a single-file base is not inside an input."""
    base = build_base(w, SHAPES, layout="file", name="bl")
    return Case(["convert", peft(w), "--to", "kohya", "--base", base, "-o", w / "new.safetensors"], 0, "",
                out=w / "new.safetensors")


@case
def case_convert_output_inside_adapter(w: Path) -> Case:
    adapter = peft(w)
    return Case(["convert", adapter, "--to", "kohya", "-o", adapter / "k.safetensors"], 2, INSIDE)


@case
def case_convert_output_inside_initial_adapter(w: Path) -> Case:
    initial = build_adapter(w, fmt="peft", modules=MODULES, name="initial", config={"init_lora_weights": "pissa"})
    pissa = build_adapter(w, fmt="peft", modules=MODULES, name="pissa", seed=1, config={"init_lora_weights": "pissa"})
    return Case(["convert", pissa, "--to", "peft", "--initial-adapter", initial, "-o", initial / "plain"], 2, INSIDE)


@case
def case_convert_dora_to_lora_base_inside(w: Path) -> Case:
    base = sharded_base(w, "bl")
    return Case(["convert", dora(w), "--to", "peft", "--dora-to-lora", base, "-o", base / "plain"], 2, INSIDE)


@case
def case_convert_dora_to_lora_base_force(w: Path) -> Case:
    base = build_base(w, SHAPES, layout="file", name="bl")
    return Case(["convert", dora(w), "--to", "kohya", "--dora-to-lora", base, "-o", base, "--force"], 2,
                r"is an input of this command")


@case
def case_merge_output_inside_base(w: Path) -> Case:
    base = sharded_base(w, "bl")
    return Case(["merge", base, peft(w), "-o", base / "merged"], 2, INSIDE)


@case
def case_merge_output_inside_adapter(w: Path) -> Case:
    adapter = peft(w)
    return Case(["merge", sharded_base(w), adapter, "-o", adapter / "merged"], 2, INSIDE)


@case
def case_merge_report_inside_base(w: Path) -> Case:
    base = sharded_base(w, "bl")
    return Case(["merge", base, peft(w), "-o", w / "merged", "--report", base / "report.json"], 2, INSIDE)


@case
def case_merge_report_onto_base_config_force(w: Path) -> Case:
    base = sharded_base(w, "bl")
    return Case(["merge", base, peft(w), "-o", w / "merged", "--report", base / "config.json", "--force"], 2, INSIDE)


@case
def case_rescale_output_inside_adapter(w: Path) -> Case:
    adapter = peft(w)
    return Case(["rescale", adapter, "--factor", "2", "-o", adapter / "x"], 2, INSIDE)


@case
def case_resize_output_inside_adapter(w: Path) -> Case:
    adapter = peft(w)
    return Case(["resize", adapter, "-r", "2", "-o", adapter / "x", "--force"], 2, INSIDE)


@case
def case_combine_output_inside_second_adapter(w: Path) -> Case:
    a, b = peft(w, "a"), peft(w, "b", seed=1)
    return Case(["combine", a, b, "-o", b / "both"], 2, INSIDE)


@case
def case_extract_output_inside_base(w: Path) -> Case:
    base = sharded_base(w, "bl")
    t = tuned(w, base, peft(w))
    return Case(["extract", base, t, "-o", base / "lora", "-r", "2"], 2, INSIDE)


@case
def case_extract_output_inside_tuned(w: Path) -> Case:
    base = sharded_base(w, "bl")
    t = tuned(w, base, peft(w))
    return Case(["extract", base, t, "-o", t / "lora", "-r", "2"], 2, INSIDE)


def test_every_path_parameter_is_covered() -> None:
    """Every click.Path parameter of a command that writes is an input (OutputPath marks outputs),
    and each has a case above."""
    from loratool.cli import COMMANDS
    from loratool.cli._options import OutputPath

    found = set()
    for command in COMMANDS:
        writes = any(isinstance(p.type, OutputPath) for p in command.params)
        if not writes or command.name == "pull":  # pull reads the Hub, no local path
            continue
        for p in command.params:
            if isinstance(p.type, click.Path) and not isinstance(p.type, OutputPath):
                found.add((command.name, p.name))
    assert found == set(COVERED)
    assert set(COVERED.values()) <= set(CASES)


def test_inputs_are_recorded_before_the_command_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The library op sees outputs.INPUTS holding every path argument; after the command it is empty again."""
    import loratool.ops.convert as ops_convert
    from loratool.io import outputs

    seen: list[list[str]] = []

    def fake(*args: object, **kwargs: object) -> None:
        seen.append(list(outputs.INPUTS))
        raise KeyboardInterrupt

    monkeypatch.setattr(ops_convert, "convert", fake)
    code, _, _ = run(capsys, ["convert", "a", "--to", "kohya", "--base", "b", "--dora-to-lora", "c", "-o", "o"])
    assert code == 130
    assert sorted(seen[0]) == ["a", "b", "c"]
    assert outputs.INPUTS == []


def test_an_hf_input_counts_by_its_local_copy(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """`--base hf://...` is the snapshot folder it resolves to: no output inside it."""
    import loratool.hub

    base = sharded_base(tmp_path, "snapshot")
    adapter = peft(tmp_path)
    real = loratool.hub.resolve_path
    monkeypatch.setattr(loratool.hub, "resolve_path",
                        lambda path, **kwargs: base if str(path).startswith("hf://") else real(path, **kwargs))
    before = snapshot(tmp_path)
    with bounded(BOUND):
        code, _, err = run(capsys, ["convert", adapter, "--to", "kohya", "--base", "hf://owner/model", "-o",
                                    base / "model-00001-of-00002.safetensors", "--force"])
    assert code == 2 and re.search(INSIDE, error_lines(err)[0]), err
    assert _changed(before, snapshot(tmp_path)) == []


# ---------------------------------------------------------------------------------------------
# 3. --force replaces only a folder of our own earlier output


@case
def case_force_merge_over_code_and_docs(w: Path) -> Case:
    out = w / "out"
    out.mkdir()
    for name, text in (("modeling.py", "print('mine')\n"), ("README.md", "# notes\n"), ("config.json", "{}\n")):
        (out / name).write_text(text)
    return Case(["merge", sharded_base(w), peft(w), "-o", out, "--force"], 2,
                r"refusing to replace it: the folder holds no weights loratool wrote, only README\.md, config\.json")


@case
def case_force_adapter_over_config_only(w: Path) -> Case:
    out = w / "out"
    out.mkdir()
    (out / "adapter_config.json").write_text('{"r": 4}\n')
    (out / "README.md").write_text("# mine\n")
    return Case(["rescale", peft(w), "--factor", "2", "-o", out, "--force"], 2,
                r"the folder holds no weights loratool wrote")


@case
def case_force_adapter_over_foreign_weights(w: Path) -> Case:
    out = peft(w, "out")  # adapter_model.safetensors written by another tool (no loratool provenance)
    return Case(["rescale", peft(w), "--factor", "2", "-o", out, "--force"], 2,
                r"the folder holds weights loratool did not write \(adapter_model\.safetensors\)")


@case
def case_force_earlier_rescale_output(w: Path) -> Case:
    from loratool.ops.rescale import rescale

    adapter = peft(w)
    rescale(adapter, w / "out", mode="factor", value=0.5)
    return Case(["rescale", adapter, "--factor", "2", "-o", w / "out", "--force"], 0, "", out=w / "out")


@case
def case_force_empty_folder(w: Path) -> Case:
    (w / "out").mkdir()
    return Case(["rescale", peft(w), "--factor", "2", "-o", w / "out", "--force"], 0, "", out=w / "out")


# ---------------------------------------------------------------------------------------------
# 11. a .safetensors -o for an output that must be a folder


@case
def case_merge_sharded_base_into_safetensors_name(w: Path) -> Case:
    return Case(["merge", sharded_base(w), peft(w), "-o", w / "mm.safetensors"], 2,
                r"mm\.safetensors: merging into .*base \(a folder: 2 shards\) writes a folder; refusing to name it")


@case
def case_merge_folder_base_into_safetensors_name(w: Path) -> Case:
    base = build_base(w, SHAPES, layout="dir")
    return Case(["merge", base, peft(w), "-o", w / "mm.safetensors"], 2, r"writes a folder; refusing to name it")


@case
def case_resize_format_peft_into_safetensors_name(w: Path) -> Case:
    return Case(["resize", peft(w), "-r", "2", "--format", "peft", "-o", w / "x.safetensors"], 2,
                r"x\.safetensors: a peft adapter is a folder; refusing to write a folder named \*\.safetensors")


@case
def case_convert_to_peft_into_safetensors_name(w: Path) -> Case:
    return Case(["convert", build_adapter(w, fmt="kohya", name="k.safetensors"), "--to", "peft", "-o",
                 w / "x.safetensors"], 2, r"a peft adapter is a folder")


@case
def case_rescale_format_mlx_into_safetensors_name(w: Path) -> Case:
    return Case(["rescale", peft(w), "--factor", "2", "--format", "mlx", "-o", w / "x.safetensors"], 2,
                r"a mlx adapter is a folder")


@case
def case_rescale_peft_into_one_file_unasked(w: Path) -> Case:
    """Without --format, -o NAME.safetensors is one file with PEFT keys (docs/formats.md), never a folder."""
    out = w / "x.safetensors"

    def one_file() -> None:
        assert out.is_file()

    return Case(["rescale", peft(w), "--factor", "2", "-o", out], 0, "", out=out, after=one_file)


@case
def case_combine_format_peft_into_safetensors_name(w: Path) -> Case:
    return Case(["combine", peft(w, "a"), peft(w, "b", seed=1), "--format", "peft", "-o", w / "x.safetensors"], 2,
                r"a peft adapter is a folder")


@case
def case_combine_peft_into_one_file_unasked(w: Path) -> Case:
    out = w / "x.safetensors"

    def one_file() -> None:
        assert out.is_file()

    return Case(["combine", peft(w, "a"), peft(w, "b", seed=1), "-o", out], 0, "", out=out, after=one_file)


# ---------------------------------------------------------------------------------------------
# 12. validate: a LoRA bias of the wrong length


def _bias_adapter(w: Path) -> Path:
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"
    return build_adapter(w, fmt="peft", modules=MODULES, extra_tensors={key: torch.ones(5)})


@case
def case_validate_bias_length(w: Path) -> Case:
    return Case(["validate", _bias_adapter(w)], 1, r"bias-shape-mismatch.*q_proj.*\(5,\).*16\s+rows")


@case
def case_validate_bias_length_with_base(w: Path) -> Case:
    return Case(["validate", _bias_adapter(w), "--base", sharded_base(w)], 1, r"bias-shape-mismatch")


@case
def case_validate_bias_right_length(w: Path) -> Case:
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"
    adapter = build_adapter(w, fmt="peft", modules=MODULES, extra_tensors={key: torch.ones(16)})
    return Case(["validate", adapter, "--base", sharded_base(w)], 0, "")


@pytest.mark.parametrize("name", sorted(CASES))
def test_output_case(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                     monkeypatch: pytest.MonkeyPatch) -> None:
    check_case(CASES[name], tmp_path, capsys, monkeypatch)


# ---------------------------------------------------------------------------------------------
# 2. lock files and temporaries found beside the output are never trusted


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _rescale(capsys: pytest.CaptureFixture[str], adapter: Path, out: Path, *extra: object) -> tuple[int, str, str]:
    with bounded(BOUND):
        return run(capsys, ["rescale", adapter, "--factor", "2", "-o", out, *extra])


def _changed(before: dict[str, object], after: dict[str, object], *, besides: str | None = None) -> list[str]:
    keys = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    return [k for k in keys if besides is None or not (k == besides or k.startswith(besides + os.sep))]


def _how(kind: str, lock: Path, w: Path) -> None:
    if kind == "hard-link":
        (w / "p").write_text("precious\n")
        os.link(w / "p", lock)
    elif kind == "symlink":
        (w / "p").write_text("precious\n")
        lock.symlink_to(w / "p")
    elif kind == "dangling-symlink":
        lock.symlink_to(w / "nowhere")
    elif kind == "fifo":
        os.mkfifo(lock)
    elif kind == "folder":
        lock.mkdir()
    else:  # a file of ours by name that holds no pid
        lock.write_text("precious\n")


LOCK_REASONS = {"hard-link": "it has 2 hard links", "symlink": "it is a symbolic link",
                "dangling-symlink": "it is a symbolic link", "fifo": "it is a FIFO", "folder": "it is a directory",
                "not-a-pid": "it holds no process id"}


@pytest.mark.parametrize("kind", sorted(LOCK_REASONS))
def test_a_lock_that_is_not_ours_is_refused_untouched(kind: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`ln p .out.lock` (or a symlink, FIFO, ...) is never opened for writing: exit 2, p unchanged."""
    adapter = peft(tmp_path)
    lock = tmp_path / ".out.lock"
    _how(kind, lock, tmp_path)
    before = snapshot(tmp_path)
    code, out, err = _rescale(capsys, adapter, tmp_path / "out")
    assert code == 2 and out == "", err
    errors = error_lines(err)
    assert len(errors) == 1 and "is not a lock loratool made" in errors[0] and LOCK_REASONS[kind] in errors[0], err
    assert "Traceback" not in err
    assert _changed(before, snapshot(tmp_path)) == []
    if kind in ("hard-link", "symlink"):
        assert (tmp_path / "p").read_text() == "precious\n"


def test_a_dead_runs_lock_is_taken_over(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = peft(tmp_path)
    lock = tmp_path / ".out.lock"
    lock.write_text(f"{_dead_pid()}\n")  # left by a run that was killed: no flock held on it
    before = snapshot(tmp_path)
    code, _, err = _rescale(capsys, adapter, tmp_path / "out")
    assert code == 0, err
    assert not lock.exists()
    assert _changed(before, snapshot(tmp_path), besides="out") == [".out.lock"]


@pytest.mark.parametrize("pid", ["99999999999", "4294967296", "0", "9" * 200])
def test_a_temporary_named_with_an_impossible_pid_is_left_alone(pid: str, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """No run can have made it: not exit 3, not removed."""
    adapter = peft(tmp_path)
    name = f".out.tmp-{pid}-0a1b2c3d"
    (tmp_path / name).write_text("someone's\n")
    before = snapshot(tmp_path)
    code, _, err = _rescale(capsys, adapter, tmp_path / "out")
    assert code == 0, err
    assert "Traceback" not in err and "removed" not in err
    assert _changed(before, snapshot(tmp_path), besides="out") == []


def _stale_old(w: Path) -> Path:
    old = w / f".out.old-{_dead_pid()}-0a1b2c3d"  # the previous output, moved aside by a run that died
    old.mkdir()
    (old / "adapter_config.json").write_text('{"old": true}\n')
    return old


def test_a_dead_runs_old_output_is_not_renamed_into_a_failing_run(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the run that moved it aside may restore it: a later run that fails while writing leaves no -o."""
    from loratool.errors import LoratoolError
    from loratool.io import writers

    def full(*args: object, **kwargs: object) -> None:
        raise LoratoolError("the disk is full (simulated)")

    adapter = peft(tmp_path)
    _stale_old(tmp_path)
    before = snapshot(tmp_path)
    monkeypatch.setattr(writers, "save_tensors", full)  # the PEFT writer imports it when it writes
    code, _, err = _rescale(capsys, adapter, tmp_path / "out")
    assert code == 2 and "simulated" in err, err
    assert not (tmp_path / "out").exists()
    assert _changed(before, snapshot(tmp_path)) == []


def test_a_dead_runs_old_output_is_kept_and_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    adapter = peft(tmp_path)
    old = _stale_old(tmp_path)
    before = snapshot(tmp_path)
    code, _, err = _rescale(capsys, adapter, tmp_path / "out")
    assert code == 0, err
    assert (old / "adapter_config.json").read_text() == '{"old": true}\n'
    text = " ".join(err.split())
    assert f"{old.name} holds an earlier output that a run which did not finish moved aside; left as it is" in text
    assert _changed(before, snapshot(tmp_path), besides="out") == []


def test_lock_races_leave_one_winner(tmp_path: Path) -> None:
    """Claims from many threads of one process: each is exclusive while held, and none is left."""
    import threading

    from loratool.errors import OutputExistsError
    from loratool.io.claims import _Claim

    holders: list[int] = []
    overlaps: list[int] = []
    refused: list[int] = []

    def claim(i: int) -> None:
        for _ in range(20):
            try:
                with _Claim(tmp_path, "out", tmp_path / "out"):
                    holders.append(i)
                    if len(holders) > 1:
                        overlaps.append(i)
                    holders.remove(i)
            except OutputExistsError:
                refused.append(i)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(4)]
    with bounded(BOUND):
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert overlaps == []
    assert sorted(os.listdir(tmp_path)) == []


# ---------------------------------------------------------------------------------------------
# 12. signals at start-up and right after the output was written


def _env(extra_path: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "LORATOOL_DEBUG"}
    parts = [str(extra_path)] if extra_path else []
    env["PYTHONPATH"] = os.pathsep.join([*parts, str(REPO), env.get("PYTHONPATH", "")])
    return env


def test_ctrl_c_while_the_command_line_loads_prints_no_traceback(tmp_path: Path) -> None:
    """KeyboardInterrupt inside the start-up imports (here: click's) ends with 130 and one line."""
    fake = tmp_path / "fake"
    (fake / "click").mkdir(parents=True)
    (fake / "click" / "__init__.py").write_text("raise KeyboardInterrupt\n")
    p = subprocess.run([sys.executable, "-m", "loratool", "--help"], capture_output=True, text=True,
                       env=_env(fake), timeout=BOUND)
    assert p.returncode == 130, p.stderr
    assert "Traceback" not in p.stderr and p.stderr.strip() == "Interrupted.", p.stderr


DRIVER = r'''
import os, signal, sys
from loratool.cli import main

real_exit = sys.exit


def exit_(code=0):
    os.kill(os.getpid(), signal.SIGINT if sys.argv[1] == "INT" else signal.SIGTERM)  # the key, just after Wrote
    real_exit(code)


sys.exit = exit_
main(sys.argv[2:])
'''


@pytest.mark.parametrize("sig", ["INT", "TERM"])
def test_a_signal_just_after_wrote_is_not_called_an_interruption(sig: str, tmp_path: Path) -> None:
    adapter = peft(tmp_path)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    p = subprocess.run([sys.executable, str(driver), sig, "rescale", str(adapter), "--factor", "2", "-o",
                        str(tmp_path / "out")], capture_output=True, text=True, env=_env(), timeout=BOUND)
    assert "\nWrote " in "\n" + p.stdout, (p.stdout, p.stderr)
    assert p.returncode == 0, p.stderr
    assert "Interrupted" not in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_corpus_covers_every_item() -> None:
    names = set(CASES)
    for needle in ("convert-base-shard-force", "convert-base-config-force", "convert-base-new-file",  # 1
                   "convert-single-file-base-force", "merge-report-inside-base",
                   "force-merge-over-code-and-docs", "force-adapter-over-config-only",  # 3
                   "merge-sharded-base-into-safetensors-name", "resize-format-peft-into-safetensors-name",  # 11
                   "validate-bias-length"):  # 12
        assert needle in names, needle
    assert re.fullmatch(r"[a-z0-9-]+", "-".join(names))


def test_the_run_that_moved_the_old_output_aside_puts_it_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without RENAME_EXCHANGE the old folder is moved aside first; if the new one then cannot be
    moved in, this run (and only this run) renames the old one back."""
    import errno

    from loratool.io import outputs

    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("old\n")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(out / "model.safetensors"), metadata={"loratool.op": "merge"})
    before = snapshot(tmp_path)
    real_rename = os.rename

    def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if ".tmp-" in os.fspath(src):
            raise OSError(errno.EIO, "simulated I/O error", os.fspath(dst))
        real_rename(src, dst)

    monkeypatch.setattr(outputs, "_renameat2", lambda src, dst, flags: False)
    monkeypatch.setattr(os, "rename", rename)
    with bounded(BOUND), pytest.raises(OSError, match="simulated"), \
            outputs.atomic_output(out, force=True, directory=True, kind="model") as tmp:
        (tmp / "config.json").write_text("new\n")
    monkeypatch.undo()
    assert snapshot(tmp_path) == before
