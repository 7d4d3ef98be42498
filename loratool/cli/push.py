from __future__ import annotations

import click

from loratool.cli._options import json_option, quiet_option, token_option


@click.command()
@click.argument("path", type=click.Path())
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", metavar="BRANCH", default=None,
              help="Branch to commit to ('/' allowed); created from the default branch if missing.")
@click.option("-m", "--message", default=None, help="Commit message.")
@click.option("--overwrite-card", is_flag=True, help="Replace a README.md already on the Hub with a generated card.")
@token_option
@json_option
@quiet_option
def push(path: str, repo_id: str, private: bool, revision: str | None, message: str | None, overwrite_card: bool,
         token: str | None, as_json: bool, quiet: bool) -> int:
    """Upload an adapter directory or file to a Hugging Face Hub model repo, in one commit.

    Creates the repo and the branch when missing. Without a README.md among the files, a model card
    is generated from the adapter (base_model, library_name, tags; ranks, alpha, targets; the
    loratool provenance); a README.md already on the Hub is kept unless --overwrite-card. REPO_ID
    without an owner means your own namespace. Needs a token with write access.

    \b
    Example: loratool push ./style-lora my-org/style-lora --private
    """
    import sys

    from loratool.cli import _render
    from loratool.cli._output import emit
    from loratool.hub import push as run

    result = run(path, repo_id, private=private, revision=revision, message=message, token=token,
                 overwrite_card=overwrite_card, progress=not (quiet or as_json) and sys.stderr.isatty())
    return emit(result.to_dict(), _render.render_push, as_json=as_json, quiet=quiet)
