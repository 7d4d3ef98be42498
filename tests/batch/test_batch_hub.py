"""batch over hf://OWNER: every model repository of OWNER, against the local Hub server of tests/hub."""

from __future__ import annotations

import json

from clirun import run_cli
from factories import build_adapter


def test_hf_owner_lists_every_repo_of_the_owner(tmp_path):
    from hub.hubserver import HubServer

    peft = build_adapter(tmp_path, fmt="peft", seed=1)
    files = {p.name: p.read_bytes() for p in peft.iterdir()}
    token = "hf_batchTestToken0123456789abcdef"
    with HubServer(users={token: "alice"}) as hub:
        for repo in ("alice/style", "alice/subject", "bob/other"):
            hub.add_repo(repo, files)
        hub.add_repo("alice/secret", files, private=True)
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_TOKEN": None, "HF_HUB_OFFLINE": None}
        r = run_cli(["batch", "inspect", "hf://alice"], env=env)
    lines = [json.loads(x) for x in r.out.splitlines()]
    items = {x["item"]: x for x in lines[:-1]}
    assert sorted(items) == ["hf://alice/style", "hf://alice/subject"], r.err  # not private, not bob's
    assert r.code == 0 and all(x["status"] == "ok" and x["result"]["format"] == "peft" for x in items.values())
