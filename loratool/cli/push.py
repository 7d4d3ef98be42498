from __future__ import annotations

import click

from loratool.cli._options import json_option, quiet_option, repo_ref, revision_option, token_option


@click.command()
@click.argument("path", type=click.Path())
@click.argument("repo_id", metavar="REPO_ID[@BRANCH]")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@revision_option
@click.option("-m", "--message", default=None, help="Commit message.")
@click.option("--overwrite-card", is_flag=True, help="Replace a README.md already on the Hub with a generated card.")
@click.option("--base-model", metavar="ID", default=None,
              help="Hub id of the base model for the card's base_model (default: the adapter's, when it is one).")
@token_option
@json_option
@quiet_option
def push(path: str, repo_id: str, private: bool, revision: str | None, message: str | None, overwrite_card: bool,
         base_model: str | None, token: str | None, as_json: bool, quiet: bool) -> int:
    """Upload an adapter directory or file to a Hugging Face Hub model repo, in one commit.

    Creates the repo and the branch when missing. Without a README.md among the files, a model card
    is generated from the adapter (base_model, library_name, tags; ranks, alpha, targets; the
    loratool provenance); a README.md already on the Hub is kept unless --overwrite-card. REPO_ID
    without an owner means your own namespace; REPO_ID@BRANCH (or --revision BRANCH, or
    hf://OWNER/REPO[@BRANCH]) commits to that branch, created from the default branch if missing.
    Needs a token with write access.

    \b
    Example: loratool push ./style-lora my-org/style-lora --private
    """
    import sys

    from loratool.cli import _render
    from loratool.cli._output import emit
    from loratool.ops.describe import push as run

    repo_id, revision, in_repo = repo_ref(repo_id, revision, what="REPO_ID")
    if in_repo:
        raise click.UsageError(f"push uploads to the root of a repo, not to a folder in it ({in_repo!r}); "
                               "put the files in a folder of that name and push the folder")
    result = run(path, repo_id, private=private, revision=revision, message=message, token=token,
                 overwrite_card=overwrite_card, base_model=base_model,
                 progress=not (quiet or as_json) and sys.stderr.isatty())
    return emit(result.to_dict(), _render.render_push, as_json=as_json, quiet=quiet)
