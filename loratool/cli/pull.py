from __future__ import annotations

import click

from loratool.cli._options import (
    OutputPath,
    force_option,
    json_option,
    local_out,
    quiet_option,
    repo_ref,
    revision_option,
    token_option,
)


@click.command()
@click.argument("repo", metavar="REPO_ID[@REVISION]")
@revision_option
@click.option("--subfolder", metavar="DIR", default=None, help="Only this folder of the repo (e.g. an adapter in a "
              "multi-adapter repo).")
@click.option("-o", "--out", type=OutputPath(), default=None, metavar="DIR", callback=local_out,
              help="Also copy the files to DIR (default: they stay in the Hugging Face cache).")
@force_option
@token_option
@json_option
@quiet_option
def pull(repo: str, revision: str | None, subfolder: str | None, out: str | None, force: bool, token: str | None,
         as_json: bool, quiet: bool) -> int:
    """Download an adapter (or a base model) from the Hugging Face Hub.

    Prints the local path, then what it holds. Files go to the Hugging Face cache (HF_HOME) and are
    fetched once; with HF_HUB_OFFLINE=1 the cache alone is used. REVISION is a branch ('/' allowed),
    tag or commit sha (or --revision REV); an hf://OWNER/REPO[@REVISION][/PATH] URL is accepted too.

    \b
    Example: loratool pull my-org/style-lora@v2 -o ./style-lora
    """
    import sys

    from loratool.cli import _render
    from loratool.cli._output import emit
    from loratool.ops.describe import pull as run

    repo_id, revision, path = repo_ref(repo, revision, what="REPO_ID")
    subfolder = subfolder or path or None
    result = run(repo_id, revision, subfolder, out, token, force=force,
                 progress=not (quiet or as_json) and sys.stderr.isatty())
    return emit(result.to_dict(), _render.render_pull, as_json=as_json, quiet=quiet)
