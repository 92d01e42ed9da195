"""The Hugging Face Hub's failures as one line: gated, unknown repository or revision, offline, a dropped download.

Used by the pretrained teachers (:mod:`kdcache.pretrained`) and by the sources that read
``hf://`` URLs through huggingface_hub's file system, which reports a gated or unknown
repository as a missing file (:func:`explain_hf_url` asks the Hub which it is). No message ever
holds a token: any token of the environment is replaced before a message is made.
"""

from __future__ import annotations

import contextlib
import os

from kdcache.errors import ConfigError


def scrub(text: str) -> str:
    """A message with any token of the environment replaced: no token is ever written or shown."""
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        token = os.environ.get(key)
        if token:
            text = text.replace(token, "***")
    return text


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return scrub(text.splitlines()[0] if text else exc.__class__.__name__)


@contextlib.contextmanager
def hub_errors(repo: str, revision: str | None, what: str):
    """Turn what huggingface_hub raises into one line that names the repository and what to do."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hub

    at = f" at revision {revision}" if revision else ""
    try:
        yield
    except hub.GatedRepoError:
        raise ConfigError(f"{what}: the Hub repository {repo} is gated: accept its terms on the Hub, then set HF_TOKEN "
                          "(or log in with `hf auth login`)") from None
    except hub.RepositoryNotFoundError:
        raise ConfigError(f"{what}: no repository {repo} on the Hub (if it is private, set HF_TOKEN)") from None
    except hub.RevisionNotFoundError:
        raise ConfigError(f"{what}: the Hub repository {repo} has no revision {revision!r}") from None
    except hub.LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise ConfigError(f"{what}: {repo}{at} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}; "
                          "download it once with network access, or point HF_HOME at a cache that holds it") from None
    except hub.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        raise ConfigError(f"{what}: the Hub answered {status or 'an error'} for {repo}{at}: {first_line(exc)}") from None
    except (OSError, ConnectionError) as exc:
        raise ConfigError(f"{what}: downloading {repo}{at} failed ({exc.__class__.__name__}: {first_line(exc)}); "
                          "run the command again to resume the download") from None
    except Exception as exc:  # httpx's transport errors (a connection dropped mid-download) are not OSErrors
        if type(exc).__module__.split(".")[0].rstrip("0123456789") not in ("httpx", "httpcore", "requests", "urllib3"):
            raise
        raise ConfigError(f"{what}: downloading {repo}{at} failed ({exc.__class__.__name__}: {first_line(exc)}); "
                          "run the command again to resume the download") from None


def explain_hf_url(url: str, what: str) -> None:
    """For an ``hf://`` URL that huggingface_hub's file system found missing: raise why, if it is the repository.

    A gated repository without a token, an unknown repository or revision, or no network is one
    :class:`ConfigError`; when the repository answers, nothing is raised (the path itself is missing).
    """
    if not url.startswith("hf://"):
        return
    parts = url.removeprefix("hf://").split("/")
    kind = {"datasets": "dataset", "spaces": "space"}.get(parts[0])
    parts = parts[1:] if kind else parts
    if len(parts) < 2:
        return
    name, _, revision = parts[1].partition("@")
    repo = f"{parts[0]}/{name}"
    from urllib.parse import unquote

    from huggingface_hub import HfApi

    revision = unquote(revision) or None
    with hub_errors(repo, revision, what):
        HfApi().repo_info(repo, repo_type=kind or "model", revision=revision)
