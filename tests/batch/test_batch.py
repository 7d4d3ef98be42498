"""loratool batch over a folder of 200 generated adapters, a few of them broken (issue 28)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from clirun import run_cli
from factories import build_adapter
from safetensors.torch import load_file

from loratool.batch.items import Item, Task, expand_inputs, shard

MODULES = {"lora_unet_down_blocks_0_attentions_0_proj_in": (8, 8),
           "lora_te1_text_model_encoder_layers_0_self_attn_k_proj": (8, 8)}
BROKEN = {"a013.safetensors": "junk", "a077.safetensors": "truncated", "a150.safetensors": "nan"}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Path:
    """200 tiny kohya adapters: a013 is not safetensors, a077 is cut short, a150 holds a NaN."""
    folder = tmp_path_factory.mktemp("fleet") / "in"
    folder.mkdir()
    for i in range(200):
        name = f"a{i:03d}.safetensors"
        build_adapter(folder, fmt="kohya", modules=MODULES, rank=2, seed=i, name=name, nan=BROKEN.get(name) == "nan")
    (folder / "a013.safetensors").write_bytes(b"not a safetensors file at all")
    raw = (folder / "a077.safetensors").read_bytes()
    (folder / "a077.safetensors").write_bytes(raw[: len(raw) - 40])
    return folder


def _lines(out: str) -> tuple[dict[str, dict], dict]:
    records = [json.loads(line) for line in out.splitlines()]
    assert all(r["type"] == "item" for r in records[:-1]) and records[-1]["type"] == "summary"
    items = {Path(r["item"]).name: r for r in records[:-1]}
    assert len(items) == len(records) - 1, "an item was reported twice"
    return items, records[-1]


def test_validate_200_isolates_failures(fleet):
    t0 = time.monotonic()
    r = run_cli(["batch", "--jobs", "2", "validate", fleet])
    assert time.monotonic() - t0 < 120  # a bound against hangs, not a speed target
    items, summary = _lines(r.out)
    assert len(items) == 200
    assert items["a013.safetensors"]["status"] == "failed"
    assert "a013.safetensors" in items["a013.safetensors"]["error"]
    assert items["a077.safetensors"]["status"] == "failed" and items["a077.safetensors"]["exit_code"] == 2
    assert items["a150.safetensors"]["status"] == "findings" and items["a150.safetensors"]["exit_code"] == 1
    assert any(f["code"] for f in items["a150.safetensors"]["result"]["findings"])
    ok = [n for n, rec in items.items() if rec["status"] == "ok"]
    assert len(ok) == 197 and all(items[n]["result"]["ok"] for n in ok) and all(items[n]["error"] is None for n in ok)
    assert (summary["total"], summary["ok"], summary["findings"], summary["failed"]) == (200, 197, 1, 2)
    assert r.code == summary["exit_code"] == 2


def test_exit_code_is_0_when_all_ok_and_1_with_findings_only(fleet):
    r = run_cli(["batch", "validate", fleet / "a000.safetensors", fleet / "a001.safetensors"])
    assert r.code == 0 and _lines(r.out)[1]["ok"] == 2
    r = run_cli(["batch", "validate", fleet / "a000.safetensors", fleet / "a150.safetensors"])
    assert r.code == 1 and _lines(r.out)[1]["findings"] == 1


def test_batch_outputs_equal_single_command_outputs(fleet, tmp_path):
    names = [f"a{i:03d}.safetensors" for i in range(1, 200, 25)]
    r = run_cli(["batch", "--jobs", "2", "--out-dir", tmp_path / "out", "rescale", "--factor", "0.5",
                 *[fleet / n for n in names]])
    assert r.code == 0, r.out
    items, _ = _lines(r.out)
    (tmp_path / "single").mkdir()
    for n in names:
        single = tmp_path / "single" / n
        s = run_cli(["rescale", fleet / n, "-o", single, "--factor", "0.5", "--json"])
        assert s.code == 0, s.err
        batch_out = Path(items[n]["out"])
        assert batch_out == tmp_path / "out" / n
        a, b = load_file(batch_out), load_file(single)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        doc = json.loads(s.out)
        assert items[n]["result"]["modules"] == doc["modules"]
    # an SVD on two workers with fewer threads each: still the single command's tensors, bit for bit
    r = run_cli(["batch", "--jobs", "2", "--out-dir", tmp_path / "rz", "resize", "--rank", "1",
                 *[fleet / n for n in names[:3]]])
    assert r.code == 0, r.out
    for n in names[:3]:
        assert run_cli(["resize", fleet / n, "-o", tmp_path / "single" / f"r_{n}", "--rank", "1", "-q"]).code == 0
        a, b = load_file(tmp_path / "rz" / n), load_file(tmp_path / "single" / f"r_{n}")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_skips_finished_items(fleet, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for n in ("a001.safetensors", "a002.safetensors", "a013.safetensors"):
        (inputs / n).write_bytes((fleet / n).read_bytes())
    args = ["batch", "--out-dir", tmp_path / "out", "rescale", "--factor", "2", inputs]
    first, _ = _lines(run_cli(args).out)
    assert first["a001.safetensors"]["status"] == "ok" and first["a013.safetensors"]["status"] == "failed"
    stamp = (tmp_path / "out" / "a001.safetensors").stat().st_mtime_ns
    # a002 changes: its key changes, so it runs again (its old output is in the way: --force replaces it)
    (inputs / "a002.safetensors").write_bytes((fleet / "a003.safetensors").read_bytes())
    r = run_cli([*args[:-1], "--force", inputs])  # other options: other keys, nothing would be skipped
    assert _lines(r.out)[1]["resumed"] == 0
    r = run_cli(["batch", "--out-dir", tmp_path / "out", "--resume", "rescale", "--factor", "2", "--force", inputs])
    items, summary = _lines(r.out)
    assert items["a001.safetensors"].get("resumed") is True and items["a002.safetensors"].get("resumed") is True
    assert items["a013.safetensors"].get("resumed") is None  # failures are tried again
    assert summary["resumed"] == 2 and summary["failed"] == 1
    assert (tmp_path / "out" / "a001.safetensors").stat().st_mtime_ns != stamp  # rewritten by the --force run
    stamp = (tmp_path / "out" / "a001.safetensors").stat().st_mtime_ns
    run_cli(["batch", "--out-dir", tmp_path / "out", "--resume", "rescale", "--factor", "2", "--force", inputs])
    assert (tmp_path / "out" / "a001.safetensors").stat().st_mtime_ns == stamp  # skipped: not written again
    ledger = [json.loads(x) for x in (tmp_path / "out" / "ledger.jsonl").read_text().splitlines()]
    assert all(len(rec["key"]) == 64 for rec in ledger)


def test_shards_cover_every_item_once(fleet):
    items = expand_inputs([str(fleet)])
    assert len(items) == 200
    for n in (1, 3, 7):
        seen = [i.input for s in range(n) for i in shard(items, f"{s}/{n}")]
        assert sorted(seen) == sorted(i.input for i in items)
    r = run_cli(["batch", "--shard", "2/7", "inspect", fleet])
    got, summary = _lines(r.out)
    assert sorted(got) == sorted(Path(i.input).name for i in shard(items, "2/7")) and summary["total"] == len(got)
    bad = run_cli(["batch", "--shard", "7/7", "inspect", fleet])
    assert bad.code == 2 and "--shard '7/7'" in bad.err


def test_manifests_give_per_item_options_and_outputs(fleet, tmp_path):
    a, b = fleet / "a005.safetensors", fleet / "a006.safetensors"
    (tmp_path / "m.jsonl").write_text(json.dumps({"input": str(a), "out": "half.safetensors", "factor": 0.5}) + "\n"
                                      + json.dumps({"input": str(b), "out": "double.safetensors", "factor": 2}) + "\n")
    (tmp_path / "m.csv").write_text(f"input,out,factor\n{a},third.safetensors,0.25\n")
    r = run_cli(["batch", "--out-dir", tmp_path / "out", "rescale", tmp_path / "m.jsonl", tmp_path / "m.csv"])
    assert r.code == 0, r.out
    items = {Path(rec["out"]).name: rec for rec in map(json.loads, r.out.splitlines()[:-1])}
    assert all(Path(rec["out"]).parent == tmp_path / "out" for rec in items.values())  # `out` is under --out-dir
    assert {k: v["result"]["value"] for k, v in items.items()} == {"half.safetensors": 0.5, "double.safetensors": 2.0,
                                                                   "third.safetensors": 0.25}
    # without --out-dir a relative `out` is beside the manifest
    r = run_cli(["batch", "rescale", tmp_path / "m.csv"])
    assert r.code == 0 and (tmp_path / "third.safetensors").is_file()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"out": "x"}\n')
    r = run_cli(["batch", "inspect", bad])
    assert r.code == 2 and "bad.jsonl:1" in r.err


def test_op_options_and_usage_errors(fleet, tmp_path):
    r = run_cli(["batch", "rescale", "--factor", "0.5", fleet / "a000.safetensors"])
    assert r.code == 2 and "--out-dir" in r.err
    r = run_cli(["batch", "--out-dir", tmp_path, "rescale", "-o", "x", fleet / "a000.safetensors"])
    assert r.code == 2 and "batch sets -o itself" in r.err
    r = run_cli(["batch", "validate", "--no-such-option", fleet / "a000.safetensors"])
    assert r.code == 2 and "no option --no-such-option" in r.err
    r = run_cli(["batch", "inspect", str(tmp_path / "*.nothing")])
    assert r.code == 2 and "matches nothing" in r.err


def test_missing_input_fails_alone(fleet, tmp_path):
    r = run_cli(["batch", "inspect", fleet / "a000.safetensors", tmp_path / "gone.safetensors"])
    items, _ = _lines(r.out)
    assert items["gone.safetensors"]["status"] == "failed" and items["a000.safetensors"]["status"] == "ok"
    assert r.code == 2


# ------------------------------------------------------------------------------------------------
# the local executor's bounds, with a runner that sleeps, dies or allocates on request


def _run(tasks, **kw):
    from helpers import sleepy

    from loratool.batch.local import run_local

    return {o.index: o for o in run_local(tasks, sleepy, **kw)}


def test_a_slow_item_times_out_alone():
    cwd = os.getcwd()
    tasks = [Task(0, ["sleep", "30"], cwd), Task(1, ["x"], cwd), Task(2, ["x"], cwd), Task(3, ["sleep", "0.1"], cwd)]
    t0 = time.monotonic()
    got = _run(tasks, jobs=2, timeout=3)
    assert time.monotonic() - t0 < 25
    assert got[0].status == "timeout" and "3 s" in got[0].detail
    assert all(got[i].status is None and got[i].code == 0 for i in (1, 2, 3))


def test_a_dying_worker_fails_its_item_alone():
    cwd = os.getcwd()
    got = _run([Task(0, ["die"], cwd), Task(1, ["x"], cwd), Task(2, ["x"], cwd)], jobs=1)
    assert got[0].status == "crashed" and "exit status 9" in got[0].detail
    assert got[1].code == 0 and got[2].code == 0


def test_a_memory_error_is_reported_as_such_and_its_worker_replaced():
    cwd = os.getcwd()
    got = _run([Task(0, ["oom"], cwd), Task(1, ["x"], cwd)], jobs=1, memory=1 << 30)
    assert got[0].status == "failed" and "MemoryError" in got[0].detail and "1024 MB" in got[0].detail
    assert got[1].code == 0


@pytest.mark.skipif(not hasattr(os, "sysconf"), reason="RLIMIT_AS needs a POSIX system")
def test_the_memory_bound_stops_a_greedy_item_alone():
    cwd = os.getcwd()
    got = _run([Task(0, ["hog", str(8 << 30)], cwd), Task(1, ["x"], cwd)], jobs=1, memory=4 << 30)
    assert got[0].status == "crashed" and got[1].code == 0


def test_items_from_folders_skip_links_out(tmp_path, fleet):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.safetensors").write_bytes((fleet / "a000.safetensors").read_bytes())
    (folder / "link.safetensors").symlink_to(fleet / "a001.safetensors")
    (folder / "notes.txt").write_text("x")
    assert [Path(i.input).name for i in expand_inputs([str(folder)])] == ["a.safetensors"]
    assert expand_inputs([str(folder / "a.safetensors"), str(folder / "a.safetensors")]) == [
        Item(str(folder / "a.safetensors"), index=0)]


def test_ledgers_shared_by_shards_and_torn_lines(tmp_path):
    from loratool.batch.ledger import Ledger

    path = tmp_path / "ledger.jsonl"
    path.write_text('{"key": "torn", "status": "o')  # a run killed mid-line
    a, b = Ledger(path), Ledger(path)
    for i in range(50):
        (a if i % 2 else b).append({"key": f"k{i}", "status": "ok", "pad": "x" * 20000})
    a.close()
    b.close()
    done = Ledger(path)
    done.load()
    assert sorted(done.done) == sorted(f"k{i}" for i in range(50))
