"""Hugging Face Hub tokens and access checks for gated models.

Two jobs, both done on the client before it connects to any peer:

1. :func:`resolve_token` picks the token: the one passed explicitly (``token=``), else the
   ``HF_TOKEN`` environment variable, else the token saved by ``hf auth login``.
2. :func:`check_model_access` asks the Hub whether that token may read the model's files and
   turns the Hub's answer into an error from :mod:`corolla.engine.errors` whose message says what
   to do (log in, request access on the model page, fix the name, go online).

The token is only ever sent to the Hub endpoint (``HF_ENDPOINT``), never to swarm peers, and it is
never logged: messages name the repo, never the token.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

import huggingface_hub
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from pydantic import SecretStr

from corolla.engine.errors import (
    AccessNotGrantedError,
    HubAccessError,
    ModelNotFoundError,
    NotLoggedInError,
    OfflineNotCachedError,
)

__all__ = ["check_model_access", "is_hub_offline", "model_page_url", "read_token_file", "resolve_token"]

logger = logging.getLogger(__name__)

_TRUE_VALUES = {"1", "on", "yes", "true"}
# The file whose presence in the local cache means "this model was downloaded before".
_CONFIG_FILE = "config.json"
_LOGIN_HINT = (
    "pass token=... (`corolla server --token-file PATH`), set the HF_TOKEN environment variable, or run `hf auth login`"
)
MAX_TOKEN_FILE_BYTES = 4096


def resolve_token(token: str | SecretStr | None) -> str | None:
    """Pick the Hugging Face token to use.

    Args:
        token: A token given explicitly (plain string or pydantic ``SecretStr``); empty means none.

    Returns:
        The explicit token, else ``HF_TOKEN`` from the environment, else the token saved by
        ``hf auth login`` (``huggingface_hub.get_token()``), else ``None``.
    """
    if isinstance(token, SecretStr):
        token = token.get_secret_value()
    if token and token.strip():
        return token.strip()
    from_env = os.environ.get("HF_TOKEN", "").strip()
    if from_env:
        return from_env
    return huggingface_hub.get_token()


def read_token_file(path: str | Path) -> str:
    """A Hugging Face token from a file (its first non-empty line), so it never shows in ``ps``.

    Raises:
        ValueError: The file is missing, unreadable, too large or empty; the message says which.
    """
    file = Path(path).expanduser()
    try:
        if file.stat().st_size > MAX_TOKEN_FILE_BYTES:
            raise ValueError(f"{file} is larger than a token file ({MAX_TOKEN_FILE_BYTES} bytes at most)")
        text = file.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read the token file {file}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"the token file {file} is not text") from e
    token = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not token:
        raise ValueError(f"the token file {file} is empty; put your Hugging Face token (hf_...) in it")
    return token


def model_page_url(repo_id: str) -> str:
    """The model's page on the Hub (where a gated model's access request form lives)."""
    return f"{hf_constants.ENDPOINT.rstrip('/')}/{repo_id}"


def is_hub_offline() -> bool:
    """Whether offline mode is on (``HF_HUB_OFFLINE=1``), read now rather than at import."""
    raw = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(hf_constants.HF_HUB_OFFLINE) or raw.strip().lower() in _TRUE_VALUES


def _is_cached(repo_id: str, cache_dir: str | Path | None) -> bool:
    found = huggingface_hub.try_to_load_from_cache(repo_id, _CONFIG_FILE, cache_dir=cache_dir)
    return isinstance(found, str)


def check_model_access(
    repo_id: str,
    token: str | None,
    *,
    cache_dir: str | Path | None = None,
) -> None:
    """Check that ``token`` may read ``repo_id`` on the Hub, before connecting to any peer.

    A local folder is not checked. In offline mode the local cache is checked instead of the Hub.

    Args:
        repo_id: A Hub repo id (``"meta-llama/Llama-3.1-8B-Instruct"``) or a local folder.
        token: The resolved token (see :func:`resolve_token`), or ``None`` for anonymous access.
        cache_dir: The Hugging Face cache to look in when offline (default: the standard one).

    Raises:
        NotLoggedInError: The repo needs a token and none was given, or the token is invalid (401).
        AccessNotGrantedError: The token's account has not been granted access to a gated repo (403).
        ModelNotFoundError: No such repo, or it is private and the token cannot see it (404).
        OfflineNotCachedError: ``HF_HUB_OFFLINE=1`` and the model is not in the local cache.
        HubAccessError: The Hub could not be reached or answered something else.
    """
    if Path(repo_id).expanduser().is_dir():
        logger.debug("%s is a local folder: no Hub access check", repo_id)
        return
    if is_hub_offline():
        _check_offline_cache(repo_id, cache_dir)
        return
    api = huggingface_hub.HfApi(endpoint=hf_constants.ENDPOINT)
    try:
        # token=False: never let huggingface_hub fall back to a token we did not choose.
        api.auth_check(repo_id, token=token or False)
    except GatedRepoError as e:
        raise _gated_error(repo_id, token, e) from e
    except RepositoryNotFoundError as e:
        raise _not_found_error(repo_id, token) from e
    except OfflineModeIsEnabled as e:
        _check_offline_cache(repo_id, cache_dir, cause=e)
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 401:
            raise NotLoggedInError(
                f"The Hugging Face Hub rejected the token used for {repo_id} as invalid or expired "
                f"(HTTP 401). Create a new token at {hf_constants.ENDPOINT}/settings/tokens, then "
                f"{_LOGIN_HINT}."
            ) from e
        raise HubAccessError(
            f"The Hugging Face Hub answered HTTP {status} when checking access to {repo_id}. "
            "Try again later, or set HF_HUB_OFFLINE=1 if the model is already downloaded."
        ) from e
    except _transport_errors() as e:  # connection refused, DNS, TLS, timeouts
        _unreachable(repo_id, cache_dir, e)
    else:
        logger.debug("Hub access to %s confirmed", repo_id)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning "the Hub could not be reached", from whichever HTTP client is installed."""
    found: list[type[BaseException]] = [OSError, TimeoutError]
    for module_name in ("httpx2", "httpx"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        found.append(module.TransportError)
    return tuple(found)


def _gated_error(repo_id: str, token: str | None, error: GatedRepoError) -> HubAccessError:
    status = error.response.status_code if error.response is not None else None
    page = model_page_url(repo_id)
    if token is None or status == 401:
        return NotLoggedInError(
            f"{repo_id} is a gated model and needs a Hugging Face token, but none was found: "
            f"{_LOGIN_HINT}. The token's account must have been granted access on {page}."
        )
    return AccessNotGrantedError(
        f"Your Hugging Face account has not been granted access to the gated model {repo_id} (HTTP 403). "
        f"Request access on {page} , wait for the approval e-mail, then try again with the same token."
    )


def _not_found_error(repo_id: str, token: str | None) -> ModelNotFoundError:
    if token is None:
        return ModelNotFoundError(
            f"Model {repo_id} was not found on the Hugging Face Hub ({hf_constants.ENDPOINT}). "
            f"Check the spelling (organization/name); if it is a private model, {_LOGIN_HINT}."
        )
    return ModelNotFoundError(
        f"Model {repo_id} was not found on the Hugging Face Hub ({hf_constants.ENDPOINT}). "
        "Check the spelling (organization/name); if it is a private model, make sure the token "
        "belongs to an account that can see it."
    )


def _check_offline_cache(repo_id: str, cache_dir: str | Path | None, cause: Exception | None = None) -> None:
    if _is_cached(repo_id, cache_dir):
        logger.debug("Offline mode: using %s from the local cache without an access check", repo_id)
        return
    where = cache_dir if cache_dir is not None else hf_constants.HF_HUB_CACHE
    error = OfflineNotCachedError(
        f"Offline mode is on (HF_HUB_OFFLINE=1) and {repo_id} is not in the local cache ({where}). "
        f"Unset HF_HUB_OFFLINE to download it, or download it once on a connected machine "
        f"(`hf download {repo_id}`), or pass the path of a local folder instead of a repo id."
    )
    if cause is not None:
        raise error from cause
    raise error


def _unreachable(repo_id: str, cache_dir: str | Path | None, error: BaseException) -> None:
    if _is_cached(repo_id, cache_dir):
        logger.warning(
            "Could not reach %s to check access to %s; using the local cache", hf_constants.ENDPOINT, repo_id
        )
        return
    raise HubAccessError(
        f"Could not reach the Hugging Face Hub at {hf_constants.ENDPOINT} to check access to {repo_id} "
        f"({type(error).__name__}). Check your connection or HF_ENDPOINT; if the model is downloaded, "
        "set HF_HUB_OFFLINE=1."
    ) from error
