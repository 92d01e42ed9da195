"""Pretrained teachers, downloaded through the libraries' own loaders and caches.

Three kinds of ``--teacher`` spec load published weights when no ``--teacher-checkpoint`` is given
(docs/cli.md, "Teacher specs"):

- timm: ``NAME.TAG``, ``timm:NAME.TAG`` or a bare ``NAME`` (timm's default tag, as
  ``pretrained=True`` takes it, said in the log), and ``hf-hub:ORG/NAME``, each with an optional
  ``@REVISION``. The weights file is fetched from the Hugging Face Hub with
  ``huggingface_hub.hf_hub_download``, then built by ``timm.create_model(..., pretrained=True)``
  from that very file. A tag whose weights are not on the Hub goes through timm's own URL loader
  (torch.hub's cache).
- torchvision: ``torchvision:NAME:WEIGHTS`` (``IMAGENET1K_V2``, ``DEFAULT``...), through its
  weights enums and torch.hub's cache, with the weights' own transforms; ``torchvision:NAME``
  takes ``DEFAULT`` and says which enum that is.
- transformers: ``hf:ORG/NAME[@REVISION]``, a Hub repository (a local directory still loads as one).

Downloads use the libraries' caches and settings (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_ENDPOINT``,
``HF_HUB_OFFLINE``, ``HF_TOKEN``, ``TORCH_HOME``) and show their progress bars. What was loaded is
pinned: the repository id, the commit the revision resolved to (from the snapshot path the Hub
cache keeps, ``.../snapshots/COMMIT/FILE``) and the sha256 of the weights file. A failure is one
line (:class:`ConfigError`) naming the repository and revision; a token never appears in it.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from pathlib import Path

from kdcache.errors import ConfigError
from kdcache.hub import first_line as _first_line
from kdcache.hub import hub_errors
from kdcache.teacher_sources import (
    LoadedTeacher,
    file_sha256,
    state_dict_sha256,
    torchvision_data_config,
)

#: The weights files a timm repository on the Hub may hold, in the order timm prefers them.
TIMM_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
#: The weights files of a transformers image classifier, in the order transformers prefers them.
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def split_revision(target: str) -> tuple[str, str | None]:
    """``("ORG/NAME", "REV")`` of ``ORG/NAME@REV``; the revision is None without an ``@``."""
    name, at, revision = target.partition("@")
    if at and (not revision or "@" in revision):
        raise ConfigError(f"teacher {target!r}: expected one @REVISION (a branch, tag or commit) after the name")
    if at and not name:
        raise ConfigError(f"teacher {target!r} names no model before @{revision}")
    return name, (revision if at else None)


def commit_of(path: str | Path) -> str:
    """The commit a file of the Hub cache belongs to: the directory after ``snapshots/``."""
    parts = Path(path).parts
    for i in range(len(parts) - 2, 0, -1):  # REPO_DIR/snapshots/COMMIT/FILE, REPO_DIR being models--ORG--NAME
        if parts[i] == "snapshots" and "--" in parts[i - 1]:
            return parts[i + 1]
    raise ConfigError(f"{path} is not a file of the Hugging Face cache (no snapshots/COMMIT/ in its path)")


def hub_file(repo: str, names, revision: str | None, what: str) -> tuple[str, str]:
    """``(local path, commit)`` of the first of ``names`` that ``repo`` holds at ``revision``, downloaded if need be."""
    from huggingface_hub import errors as hub
    from huggingface_hub import hf_hub_download

    with hub_errors(repo, revision, what):
        for name in names:
            try:
                path = hf_hub_download(repo, name, revision=revision)
            except hub.LocalEntryNotFoundError:
                raise
            except hub.EntryNotFoundError:
                continue
            return path, commit_of(path)
    at = f" at revision {revision}" if revision else ""
    raise ConfigError(f"{what}: the Hub repository {repo}{at} holds none of {', '.join(names)}")


# --- timm ----------------------------------------------------------------------------------------


def timm_repo(name: str) -> str | None:
    """The Hub repository of a timm spec's weights (``hf-hub:ORG/NAME`` or a tag's ``hf_hub_id``), None if off the Hub."""
    import timm

    if name.startswith("hf-hub:"):
        return name.removeprefix("hf-hub:")
    try:
        cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError:
        return None
    repo = getattr(cfg, "hf_hub_id", None)
    if repo and repo.endswith("/"):
        repo = repo + name if "." in name else repo + f"{name}.{cfg.tag}"
    return repo or None


def load_timm_pretrained(spec: str, *, log=None) -> LoadedTeacher:
    """A timm teacher with its published weights: ``NAME[.TAG][@REV]`` or ``hf-hub:ORG/NAME[@REV]``."""
    import timm

    name, revision = split_revision(spec)
    what = f"teacher {spec}"
    weights_path = None
    if name.startswith("hf-hub:"):
        repo = name.removeprefix("hf-hub:")
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise ConfigError(f"{what}: expected hf-hub:ORG/NAME (a timm model repository on the Hub)")
        _, commit = hub_file(repo, ("config.json",), revision, what)
        weights_path, _ = hub_file(repo, TIMM_WEIGHTS, commit, what)
        with hub_errors(repo, commit, what):
            try:
                model = timm.create_model(f"hf-hub:{repo}@{commit}", pretrained=True)
            except (RuntimeError, KeyError, ValueError) as exc:
                raise ConfigError(f"{what}: the repository {repo} is not a timm model ({_first_line(exc)})") from None
    else:
        arch, _, tag = name.partition(".")
        if not timm.is_model(arch):
            raise ConfigError(f"unknown teacher model {arch!r}: not a timm model name (see timm.list_models())")
        try:
            cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=False)
        except RuntimeError:
            cfg = None
        tags = timm.list_pretrained(f"{arch}.*")
        if cfg is None or not (getattr(cfg, "hf_hub_id", None) or getattr(cfg, "url", None)):
            known = (f"; its pretrained tags: {', '.join(tags[:8])}" + (" ..." if len(tags) > 8 else "")) if tags else ""
            raise ConfigError(f"{what}: timm has no pretrained weights for {name!r}{known}"
                              f"{'' if tags else '; give --teacher-checkpoint FILE'}")
        name = f"{arch}.{cfg.tag}" if cfg.tag else arch
        if not tag and log is not None:
            log(f"teacher {arch}: timm's default pretrained tag, {name}")
        repo = timm_repo(name)
        if repo:
            files = (cfg.hf_hub_filename,) if getattr(cfg, "hf_hub_filename", None) else TIMM_WEIGHTS
            weights_path, commit = hub_file(repo, files, revision, what)
            try:
                model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": weights_path})
            except (RuntimeError, OSError, ValueError, KeyError) as exc:
                raise ConfigError(f"{what}: the weights file {weights_path} of {repo} does not load into {name} "
                                  f"({_first_line(exc)})") from None
        else:
            if revision is not None:
                raise ConfigError(f"{what}: the weights of {name} are not on the Hugging Face Hub, so they have no revision")
            commit = None
            with hub_errors(name, None, what):
                model = timm.create_model(name, pretrained=True)  # timm's URL loader, torch.hub's cache
            from torch.hub import get_dir

            found = Path(get_dir()) / "checkpoints" / os.path.basename(cfg.url)
            weights_path = str(found) if found.is_file() else None
    cfg = dict(model.pretrained_cfg)
    labels = cfg.get("label_names")
    if not labels:
        with contextlib.suppress(Exception):  # ImageNet subsets name their classes by WordNet synset
            from timm.data import ImageNetInfo, infer_imagenet_subset

            subset = infer_imagenet_subset(model)
            labels = ImageNetInfo(subset).label_names() if subset else None
    if labels and len(labels) == model.num_classes:
        cfg["class_names"] = [str(v) for v in labels]
    sha = file_sha256(weights_path) if weights_path else state_dict_sha256(model.state_dict())
    return LoadedTeacher(model=model, name=name, source="timm", weights=weights_path, weights_sha256=sha,
                         num_classes=int(model.num_classes), meta=cfg, repo=repo, revision=commit)


# --- torchvision ---------------------------------------------------------------------------------


def load_torchvision_weights(name: str, weights: str | None, *, log=None) -> LoadedTeacher:
    """A torchvision teacher with a weights enum's published weights (torch.hub's cache, ``TORCH_HOME``)."""
    import torchvision

    what = f"teacher torchvision:{name}" + (f":{weights}" if weights else "")
    if name not in torchvision.models.list_models():
        raise ConfigError(f"unknown teacher model {name!r}: not a torchvision model name (see torchvision.models.list_models())")
    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        raise ConfigError(f"{what}: torchvision has no pretrained weights for {name!r}; give --teacher-checkpoint FILE") from None
    choices = ", ".join(["DEFAULT"] + [w.name for w in enum])
    try:
        chosen = enum.DEFAULT if weights in (None, "DEFAULT") else enum[weights]
    except KeyError:
        raise ConfigError(f"{what}: {name} has no weights {weights!r}; expected one of {choices}") from None
    if weights in (None, "DEFAULT") and log is not None:
        log(f"teacher torchvision:{name}: the DEFAULT weights are {chosen.name}")
    from torch.hub import get_dir

    path = Path(get_dir()) / "checkpoints" / os.path.basename(chosen.url)
    try:
        model = torchvision.models.get_model(name, weights=chosen)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        cached = f" (torch.hub's cache holds {path}: remove it to download it again)" if path.is_file() else \
            f" (not in torch.hub's cache {path.parent})"
        raise ConfigError(f"{what}: cannot load {chosen.url}{cached}: {_first_line(exc)}") from None
    transforms = chosen.transforms()
    meta = torchvision_data_config(name, transforms)
    categories = chosen.meta.get("categories")
    if categories:
        meta["class_names"] = [str(c) for c in categories]
    num_classes = len(categories) if categories else int(chosen.meta.get("num_classes", 1000))
    return LoadedTeacher(model=model, name=name, source="torchvision", weights=str(path),
                         weights_sha256=file_sha256(path), num_classes=num_classes, meta=meta,
                         repo=chosen.url, revision=str(chosen))


# --- transformers from the Hub -------------------------------------------------------------------


def hf_snapshot(target: str) -> tuple[str, str, str, str]:
    """``(snapshot directory, weights file, repo, commit)`` of ``ORG/NAME[@REV]``: config, processor and weights fetched."""
    repo, revision = split_revision(target)
    what = f"teacher hf:{target}"
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ConfigError(f"{what}: expected hf:ORG/NAME[@REVISION] (a Hub repository) or hf:DIR (a local directory)")
    config, commit = hub_file(repo, ("config.json",), revision, what)
    hub_file(repo, ("preprocessor_config.json",), commit, what)
    weights, _ = hub_file(repo, HF_WEIGHTS, commit, what)
    return str(Path(config).parent), weights, repo, commit


def pin_revision(spec: str, recorded_repo: str | None, recorded_revision: str | None) -> str:
    """The spec that loads a cache's teacher: a spec of the recorded repository without ``@REVISION`` gets its commit.

    Any other spec is returned as it is; :func:`kdcache.teacher.load_teacher` then refuses a
    teacher of the same repository whose revision resolved to another commit.
    """
    if not (recorded_repo and recorded_revision):
        return spec
    kind, colon, target = spec.partition(":")
    if kind == "hf":
        repo, revision = split_revision(target)
    elif kind in ("timm", "hf-hub") or not colon:
        name, revision = split_revision(target if kind == "timm" else spec)
        try:
            repo = timm_repo(name)
        except Exception:  # a name timm does not know: loading it says so
            repo = None
    else:
        return spec
    if repo != recorded_repo or revision is not None:
        return spec
    return f"{spec}@{recorded_revision}"
