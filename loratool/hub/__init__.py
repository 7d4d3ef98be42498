"""The Hugging Face Hub: `hf://` input paths, pull, push and the model card we generate.

    hf://OWNER/REPO[@REVISION][/PATH]

REVISION is a branch, tag or commit sha. A branch whose name holds '/' is written with '%2F'
(`hf://me/adapters@exp%2Frank16/style`), as in huggingface_hub's own hf:// URIs; `refs/pr/N` is
accepted as is. Downloads go through the Hugging Face cache, so a file is fetched once and
HF_HUB_OFFLINE=1 works from what is cached.

Library rules: nothing here prints or exits; huggingface_hub is imported inside functions (so
`loratool --help` stays fast); every Hub failure leaves as a HubError(message, hint) that names the
repo, and the token never appears in a message. HF_ENDPOINT, HF_HOME / HF_HUB_CACHE, HF_TOKEN and
HF_HUB_OFFLINE are read when a function is called, not when huggingface_hub was imported.

Modules: urls (hf:// paths, repo ids), pull (downloads, hf:// resolution), push (uploads),
card (the generated model card), describe (Described, and header-only descriptions; an adapter is described by
loratool.ops.describe, which pull and push take from their caller), errors (Hub failures ->
HubError), _env (environment and client), _guard (the client's transport: a deadline per request,
and the server's answers checked before huggingface_hub acts on them).
"""

from loratool.hub.card import model_card
from loratool.hub.describe import Described, describe_files
from loratool.hub.pull import FILE_PATTERNS, PEFT_CONFIG, PICKLE_PATTERNS, PullResult, pull, resolve_path
from loratool.hub.push import PushResult, push
from loratool.hub.urls import (
    DEFAULT_REVISION,
    HF_SCHEME,
    HfUrl,
    cached_url,
    check_repo_file,
    is_hf_url,
    parse_hf_url,
    split_repo_ref,
)

__all__ = [
    "DEFAULT_REVISION", "FILE_PATTERNS", "HF_SCHEME", "PEFT_CONFIG", "PICKLE_PATTERNS", "Described", "HfUrl",
    "PullResult", "PushResult", "cached_url", "check_repo_file", "describe_files", "is_hf_url", "model_card",
    "parse_hf_url", "pull", "push", "resolve_path", "split_repo_ref",
]
