"""Run one command over many adapters: the work list, the ledger and the executors behind `loratool batch`.

The library side of batch knows nothing about click: an item is an argument list for one command
(`["validate", "/abs/a.safetensors", "--json"]`) and a runner is a top-level function
`runner(argv, cwd) -> (exit_code, stdout, stderr)` that the executor calls in its workers (the CLI
passes `loratool.cli.run_item`, which runs the very command the single-adapter CLI runs).

- items.py: inputs (paths, globs, folders, JSONL/CSV manifests, hf://OWNER) -> Items; shards; output names
- ledger.py: the content hash of an input, an item's key, and the JSONL ledger --resume reads
- local.py: a pool of worker processes started once (forkserver), with a time and memory bound per item
- raycluster.py: the same as Ray tasks on an existing cluster (optional extra loratool[ray])
"""

from __future__ import annotations

from loratool.batch.items import Item, Outcome, Task

__all__ = ["Item", "Outcome", "Task"]
