"""The one boundary where Hub and transport failures become HubError (token scrubbed)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from loratool.errors import HubError, LoratoolError, register_secret, scrub
from loratool.hub._env import TIMEOUT_ENV, _client_timeout, _hf_quiet
from loratool.hub._guard import HostileAnswer
from loratool.hub.urls import _repo_of


def _scrub(text: str, token: str | None) -> str:
    """errors.scrub (the one scrubber), with the token of this call known to it."""
    register_secret(token)
    return scrub(text)


def _is_network_error(e: BaseException) -> bool:
    """A transport failure (refused, DNS, timeout, TLS...). huggingface_hub 2.x raises httpx2
    exceptions that are not OSError, 0.x raised requests'; recognise them by module, never import."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (ConnectionError, TimeoutError)):
            return True
        for cls in type(cur).__mro__:
            mod = cls.__module__ or ""
            if mod.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3") and any(
                w in cls.__name__ for w in ("Connect", "Timeout", "Network", "Transport", "Protocol", "Proxy")
            ):
                return True
        cur = cur.__cause__ or cur.__context__
    return False


def _status(e: BaseException) -> int | None:
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _server_says(e: BaseException, token: str | None) -> str:
    msg = getattr(e, "server_message", None) or ""
    msg = " ".join(str(msg).split())
    return f" ({_scrub(msg, token)})" if msg else ""


def _token_hint(token: str | None) -> str:
    if token:
        return "use a token of an account that can read it (--token, HF_TOKEN or `hf auth login`)"
    return "if it is private, log in with `hf auth login`, set HF_TOKEN or pass --token"


def _is_timeout(e: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, TimeoutError) or "Timeout" in type(cur).__name__:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _as_hub_error(e: BaseException, *, where: str, endpoint: str, token: str | None, offline: bool,
                  writing: bool = False, timeout: float | None = None) -> HubError | None:
    """Translate a huggingface_hub / transport exception into our HubError; None for anything else."""
    from huggingface_hub import errors as hfe

    def err(message: str, hint: str | None) -> HubError:
        return HubError(_scrub(message, token), _scrub(hint, token) if hint else None)

    not_cached = tuple(c for c in (getattr(hfe, "LocalEntryNotFoundError", None),
                                   getattr(hfe, "RevisionResolutionError", None),
                                   getattr(hfe, "CachedRepoTreeNotFoundError", None)) if c is not None)
    if isinstance(e, hfe.OfflineModeIsEnabled) or (offline and isinstance(e, not_cached)):
        return err(f"{where}: not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading",
                   "unset HF_HUB_OFFLINE and run the command once online (or `loratool pull` it first)")
    if isinstance(e, hfe.GatedRepoError):
        who = "this account has not been granted access" if token else "you are not logged in"
        return err(f"{where}: the repository is gated and {who}" + _server_says(e, token),
                   f"request access on {endpoint}/{_repo_of(where)}, then use a token of that account "
                   "(--token, HF_TOKEN or `hf auth login`)")
    if isinstance(e, hfe.RepositoryNotFoundError):
        return err(f"{where}: repository not found (or it is private and "
                   + ("this token cannot see it)" if token else "you are not logged in)"),
                   f"check the name; {_token_hint(token)}")
    if isinstance(e, hfe.RevisionNotFoundError):
        return err(f"{where}: revision not found in the repository",
                   "use an existing branch, tag or commit sha; in an hf:// path write a '/' in a branch name as "
                   "%2F (hf://OWNER/REPO@feature%2Fx/PATH)")
    if isinstance(e, hfe.EntryNotFoundError) and not isinstance(e, not_cached):
        return err(f"{where}: no such file or folder in the repository",
                   f"the repository's files are listed at {endpoint}/{_repo_of(where)}/tree/main")
    if isinstance(e, getattr(hfe, "LocalTokenNotFoundError", ())):
        return err(f"{where}: no Hugging Face token found",
                   "log in with `hf auth login`, set HF_TOKEN or pass --token")
    status = _status(e)
    if status == 401:
        return err(f"{where}: the Hub rejected the token (401 Unauthorized)",
                   "the token from --token, HF_TOKEN or `hf auth login` is invalid or expired; "
                   "create a new one in your Hub settings (Access Tokens)")
    if status == 403:
        what = "write to" if writing else "read"
        return err(f"{where}: permission denied (403 Forbidden): this token cannot {what} it" + _server_says(e, token),
                   "use a token with write access to that namespace, or push to your own namespace"
                   if writing else _token_hint(token))
    if timeout is not None and not isinstance(e, not_cached) and _is_timeout(e):
        hint = f"check the network and HF_ENDPOINT; {TIMEOUT_ENV}=SECONDS waits longer"
        if writing:
            return err(f"{where}: the Hub at {endpoint} did not answer within {timeout:g} s", hint)
        return err(f"{where}: the Hub at {endpoint} did not answer within {timeout:g} s and the files are not "
                   "in the local cache", hint + "; files pulled before work offline with HF_HUB_OFFLINE=1")
    if isinstance(e, not_cached) or _is_network_error(e):
        why = "" if isinstance(e, not_cached) else f" ({type(e).__name__})"
        if writing:
            return err(f"{where}: cannot reach the Hub at {endpoint}{why}", "check the network and HF_ENDPOINT")
        return err(f"{where}: cannot reach the Hub at {endpoint}{why} and the files are not in the local cache",
                   "check the network and HF_ENDPOINT; files pulled before work offline with HF_HUB_OFFLINE=1")
    if type(e).__name__ == "TooManyRedirects":
        return err(f"{where}: the Hub at {endpoint} redirects in a loop", "check HF_ENDPOINT; the server is "
                   "misconfigured or hostile")
    if status == 404:  # not the Hub's RepoNotFound/EntryNotFound: a server that is not a Hub, or a wrong path
        return err(f"{where}: the server at {endpoint} answered 404 Not Found" + _server_says(e, token),
                   f"check HF_ENDPOINT ({endpoint}): it does not look like a Hugging Face Hub; and check the "
                   "repository name")
    if status is not None and (status >= 500 or status == 429):
        return err(f"{where}: the Hub answered {status}" + _server_says(e, token),
                   "retry later; if it persists, check the status of the Hub")
    if status is not None:
        return err(f"{where}: the Hub at {endpoint} answered {status}" + _server_says(e, token),
                   "check HF_ENDPOINT and the repository name")
    sizes = re.search(r"should be of size (\d+) but has size (\d+)", str(e)) if isinstance(e, OSError) else None
    if sizes:  # huggingface_hub's size check of a download
        return err(f"{where}: a downloaded file has {sizes[2]} bytes where the Hub announced {sizes[1]}",
                   "retry; if it persists, the server is broken or hostile (check HF_ENDPOINT)")
    if isinstance(e, ValueError) and str(e).startswith("Invalid metadata in README.md"):
        return err(f"{where}: the Hub refused README.md: {' '.join(str(e).split())}",
                   "fix the YAML front matter of README.md")
    if isinstance(e, OSError) and e.errno is not None:
        return err(f"{where}: {(e.strerror or str(e)).lower()}" + (f": {e.filename}" if e.filename else ""),
                   "check free space and permissions of the Hugging Face cache (HF_HOME)")
    return None


@contextlib.contextmanager
def _boundary(*, where: str, endpoint: str, token: str | None, offline: bool, writing: bool = False,
              progress: bool = False, timeout: float | None = None) -> Iterator[None]:
    """Run Hub calls (each request bounded by `timeout` seconds); turn their failures into HubError
    (anything unrecognised is a bug and propagates)."""
    try:
        with _hf_quiet(progress), (_client_timeout(timeout) if timeout else contextlib.nullcontext()):
            yield
    except HostileAnswer as e:
        raise HubError(_scrub(f"{where}: {e.message}", token), e.hint) from None
    except LoratoolError:
        raise
    except Exception as e:
        ours = _ours(e)  # a refusal of the guard, wrapped by huggingface_hub into its own error
        if isinstance(ours, HostileAnswer):
            raise HubError(_scrub(f"{where}: {ours.message}", token), ours.hint) from None
        if ours is not None:
            raise ours from None
        mapped = _as_hub_error(e, where=where, endpoint=endpoint, token=token, offline=offline, writing=writing,
                               timeout=timeout)
        if mapped is None:
            raise
        raise mapped from e


def _ours(e: BaseException) -> LoratoolError | None:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, LoratoolError):
            return cur
        cur = cur.__cause__ or cur.__context__
    return None

