"""Where a teacher comes from: one loader per kind of ``--teacher`` spec (docs/cli.md, "Teacher specs").

Published weights downloaded by name (timm tags, ``hf-hub:``, torchvision weights enums,
``hf:ORG/NAME``) are loaded by :mod:`kdcache.pretrained`, which builds on these loaders.

Each loader returns a :class:`LoadedTeacher`: the module (a batch of normalised views in, logits
out), what its weights are and their sha256, its class count, and its data config (input size,
mean, std, interpolation, class names). The class count is always read from the weights or from a
forward pass, never assumed: no teacher is built with a silently re-initialised head.

The weights' sha256 is the file's for a checkpoint, TorchScript or torch.export file; for a
Hugging Face directory and a Python callable it is computed canonically (:func:`directory_sha256`,
:func:`state_dict_sha256`), so the same weights give the same digest on any machine.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kdcache.errors import ConfigError, MismatchError

#: Key under which kdcache training checkpoints store the model's data config.
MODEL_META_KEY = "kdcache_model"
#: The metadata entry a TorchScript or torch.export teacher file carries (its data config, JSON).
FILE_META_NAME = "kdcache.json"
IMAGENET = {"input_size": [3, 224, 224], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "interpolation": "bilinear"}
#: PIL's resampling filters by number, as Hugging Face image processors store them.
_RESAMPLING = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass(frozen=True, kw_only=True)
class LoadedTeacher:
    model: torch.nn.Module
    name: str
    source: str
    weights: str | None  # the file or directory holding the weights (None: a Python callable)
    weights_sha256: str
    num_classes: int
    meta: dict = field(default_factory=dict)  # input_size, mean, std, interpolation, class_names (as found)
    repo: str | None = None  # where published weights come from: a Hub repository id, or torchvision's weights URL
    revision: str | None = None  # the Hub commit they resolved to, or torchvision's weights enum


# --- digests -------------------------------------------------------------------------------------


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def directory_files(root: str | Path) -> list[str]:
    """The files a directory's digest covers: regular files, relative POSIX paths, sorted; no hidden ones."""
    root = Path(root)
    found = []
    for path in root.rglob("*"):
        relative = path.relative_to(root)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts):
            found.append(relative.as_posix())
    return sorted(found)


def directory_sha256(root: str | Path) -> str:
    """sha256 of the text ``"<sha256 of file>  <relative path>\\n"`` for each of :func:`directory_files`.

    The text is what ``sha256sum`` prints for the files in that order, so
    ``cd DIR && find . -type f -not -path '*/.*' | sed 's|^./||' | LC_ALL=C sort | xargs sha256sum | sha256sum``
    gives the same digest.
    """
    lines = "".join(f"{file_sha256(Path(root) / name)}  {name}\n" for name in directory_files(root))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def state_dict_sha256(state: dict) -> str:
    """sha256 over a state dict's tensors in key order: for each, the key, dtype and shape, then the raw bytes.

    Each entry contributes ``"<key>\\0<dtype>\\0<d0,d1,...>\\0"`` (UTF-8; dtype as torch names it
    without ``torch.``, e.g. ``float32``) followed by the tensor's bytes, C-contiguous, native byte
    order. Entries that are not tensors are skipped.
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key]
        if not isinstance(tensor, torch.Tensor):
            continue
        tensor = tensor.detach().cpu().contiguous()
        dtype = str(tensor.dtype).removeprefix("torch.")
        digest.update(f"{key}\0{dtype}\0{','.join(str(d) for d in tensor.shape)}\0".encode("utf-8"))
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --- checkpoints ---------------------------------------------------------------------------------


def load_state(path: str) -> dict:
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return {"state_dict": load_file(path)}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"teacher checkpoint {path} cannot be read as a weights file ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise ConfigError(f"teacher checkpoint {path} holds a {type(state).__name__}, expected a state dict")
    if "checkpoint_version" in state and isinstance(state.get("parts"), dict):  # kdcache.checkpoint's layout
        model_pt = Path(path).parent / "model.pt"
        raise ConfigError(f"teacher checkpoint {path} is a train-student checkpoint, kept to --resume the run; it lacks the "
                          f"input size and normalisation a teacher needs. Use the run's {model_pt}, written when the run "
                          + ("finished" if model_pt.is_file() else "finishes (resume the run to finish it)"))
    return state


def state_dict_of(state: dict) -> dict:
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state.get(key), dict) and state[key]:
            inner = state[key]
            return {k.removeprefix("module."): v for k, v in inner.items()}
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def describe_misfit(expected: dict, weights: dict, *, shown: int = 3) -> str:
    """What keeps ``weights`` from loading into a model whose state dict is ``expected``: the first
    ``shown`` missing keys, unexpected keys and differing shapes, each with how many there are."""

    def listed(names: list[str], what: str) -> str:
        more = f", ... ({len(names) - shown} more)" if len(names) > shown else ""
        return f"{len(names)} {what} ({', '.join(names[:shown])}{more})"

    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    def shape(tensor) -> str:
        return "x".join(str(d) for d in tensor.shape) or "scalar"

    shapes = [f"{k} {shape(weights[k])} (model: {shape(v)})" for k, v in expected.items()
              if k in weights and isinstance(weights[k], torch.Tensor) and tuple(weights[k].shape) != tuple(v.shape)]
    parts = [listed(names, what) for names, what in ((missing, "missing key(s)"), (unexpected, "unexpected key(s)"),
                                                     (shapes, "shape(s) differ"))
             if names]
    return "; ".join(parts)


def _load_strict(model: torch.nn.Module, weights: dict, checkpoint: str, what: str) -> None:
    misfit = describe_misfit(model.state_dict(), weights)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise MismatchError(f"teacher checkpoint {checkpoint} does not fit {what}: "
                            f"{misfit or str(exc).splitlines()[0]}") from None


# --- timm and torchvision: an architecture name plus a checkpoint ---------------------------------


def load_timm(name: str, checkpoint: str) -> LoadedTeacher:
    import timm

    if not timm.is_model(name):
        raise ConfigError(f"unknown teacher model {name!r}: not a timm model name (see timm.list_models())")
    state = load_state(checkpoint)
    probe = timm.create_model(name, pretrained=False, num_classes=1)
    head = probe.pretrained_cfg.get("classifier", "head")
    head = head[0] if isinstance(head, (list, tuple)) else head
    weights = state_dict_of(state)
    head_weight = weights.get(f"{head}.weight")
    if head_weight is None:
        raise ConfigError(f"teacher checkpoint {checkpoint} has no classifier weight {head}.weight for {name!r}")
    num_classes = int(head_weight.shape[0])
    meta = dict(state.get(MODEL_META_KEY) or {})
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **meta.get("model_kwargs", {}))
    _load_strict(model, weights, checkpoint, repr(name))
    cfg = dict(model.pretrained_cfg)
    cfg.update(meta)
    return LoadedTeacher(model=model, name=name, source="timm", weights=checkpoint, weights_sha256=file_sha256(checkpoint),
                         num_classes=num_classes, meta=cfg)


def torchvision_data_config(name: str, transforms=None) -> dict:
    """Input size, mean, std and interpolation from torchvision's weights metadata, else ImageNet's.

    ``transforms``: those of the weights in use (``weights.transforms()``); else the DEFAULT weights'.
    """
    import torchvision

    try:
        transforms = transforms or torchvision.models.get_model_weights(name).DEFAULT.transforms()
    except (ValueError, KeyError, AttributeError, TypeError):
        return dict(IMAGENET)
    size = transforms.crop_size
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    return {"input_size": [3, size, size], "mean": list(transforms.mean), "std": list(transforms.std),
            "interpolation": str(transforms.interpolation.value)}


def load_torchvision(name: str, checkpoint: str) -> LoadedTeacher:
    import torchvision

    if name not in torchvision.models.list_models():
        raise ConfigError(f"unknown teacher model {name!r}: not a torchvision model name (see torchvision.models.list_models())")
    state = load_state(checkpoint)
    weights = state_dict_of(state)
    probe = torchvision.models.get_model(name, weights=None).state_dict()
    default = 1000  # torchvision's architectures are built for ImageNet-1k unless told otherwise
    heads = [k for k, v in probe.items() if k.endswith("weight") and v.ndim >= 2 and v.shape[0] == default]
    if not heads:
        raise ConfigError(f"teacher {name!r}: cannot tell which torchvision parameter is its classifier")
    head = heads[-1]
    if head not in weights:
        raise ConfigError(f"teacher checkpoint {checkpoint} has no classifier weight {head} for torchvision {name!r}")
    num_classes = int(weights[head].shape[0])
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    _load_strict(model, weights, checkpoint, f"torchvision {name!r}")
    meta = torchvision_data_config(name)
    meta.update(state.get(MODEL_META_KEY) or {})
    return LoadedTeacher(model=model, name=name, source="torchvision", weights=checkpoint,
                         weights_sha256=file_sha256(checkpoint), num_classes=num_classes, meta=meta)


# --- a local Hugging Face directory --------------------------------------------------------------


class HFLogits(torch.nn.Module):
    """A transformers image classifier as a teacher: views in (``pixel_values``), ``.logits`` out."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=images).logits


def _size_entry(value, key: str):
    return value.get(key) if isinstance(value, dict) else getattr(value, key, None)


def hf_data_config(processor, where: str) -> dict:
    """Input size, mean, std and resampling of a Hugging Face image processor.

    The size is ``crop_size`` when the processor centre-crops, else ``size``: ``height`` x
    ``width``, or ``shortest_edge`` as a square.
    """
    size = None
    attrs = ("size",) if getattr(processor, "do_center_crop", None) is False else ("crop_size", "size")
    for attr in attrs:
        value = getattr(processor, attr, None)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            value = {"shortest_edge": int(value)}
        height, width, edge = (_size_entry(value, key) for key in ("height", "width", "shortest_edge"))
        if height and width:
            size = [3, int(height), int(width)]
        elif edge:
            size = [3, int(edge), int(edge)]
        if size is not None:
            break
    if size is None:
        raise ConfigError(f"teacher directory {where}: its image processor states no size (size or crop_size)")
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    if mean is None or std is None:
        raise ConfigError(f"teacher directory {where}: its image processor states no image_mean or image_std")
    resample = getattr(processor, "resample", None)
    resample = 2 if resample is None else getattr(resample, "value", resample)  # PIL's enum, or torchvision's
    if isinstance(resample, str):
        interpolation = resample.lower()
    else:
        interpolation = _RESAMPLING.get(int(resample), str(resample))
    return {"input_size": size, "mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "interpolation": interpolation}


def load_hf(directory: str) -> LoadedTeacher:
    try:
        import transformers
    except ImportError:
        raise ConfigError("hf: teachers need transformers: pip install 'kdcache[hf]'") from None
    hf_logging = transformers.utils.logging
    bar, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()  # loading is quick; stderr is for kdcache's own lines
    hf_logging.set_verbosity_error()
    try:
        model = transformers.AutoModelForImageClassification.from_pretrained(directory, local_files_only=True)
        processor = transformers.AutoImageProcessor.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ConfigError(f"teacher directory {directory} is not a Hugging Face image classifier with an image processor: {first}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    meta = hf_data_config(processor, directory)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)] if model.config.id2label else []
    if labels and labels != [f"LABEL_{i}" for i in range(len(labels))]:
        meta["class_names"] = [str(v) for v in labels]
    wrapped = HFLogits(model)
    num_classes = probe_classes(wrapped, meta["input_size"], f"teacher directory {directory}")
    if num_classes != model.config.num_labels:
        raise MismatchError(f"teacher directory {directory}: config.json says {model.config.num_labels} labels, the model gives {num_classes} logits")
    return LoadedTeacher(model=wrapped, name=type(model).__name__, source="hf", weights=directory,
                         weights_sha256=directory_sha256(directory), num_classes=num_classes, meta=meta)


# --- a Python callable ---------------------------------------------------------------------------


def _import(module: str):
    if module.endswith(".py"):
        path = Path(module)
        if not path.is_file():
            raise ConfigError(f"teacher module file {module} does not exist")
        spec = importlib.util.spec_from_file_location(f"kdcache_teacher_{path.stem}", path)
        loaded = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(loaded)
        except Exception as exc:
            raise ConfigError(f"teacher module file {module} fails to import ({exc.__class__.__name__}: {exc})") from None
        return loaded
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"teacher module {module!r} cannot be imported ({exc})") from None


def load_python(module: str, function: str) -> LoadedTeacher:
    where = f"python:{module}:{function}"
    found = getattr(_import(module), function, None)
    if not callable(found):
        raise ConfigError(f"teacher {where}: module {module} has no function {function!r}")
    try:
        result = found()
    except Exception as exc:
        raise ConfigError(f"teacher {where} failed ({exc.__class__.__name__}: {exc})") from None
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module) and isinstance(result[1], dict)):
        raise ConfigError(f"teacher {where} returned {type(result).__name__}; expected a tuple (torch.nn.Module, data config dict)")
    model, meta = result
    meta = check_data_config(meta, f"teacher {where}")
    num_classes = probe_classes(model, meta["input_size"], f"teacher {where}", stated=meta.get("num_classes"))
    return LoadedTeacher(model=model, name=f"{module}:{function}", source="python", weights=None,
                         weights_sha256=state_dict_sha256(model.state_dict()), num_classes=num_classes, meta=meta)


# --- TorchScript and torch.export files ----------------------------------------------------------


class CompiledTeacher(torch.nn.Module):
    """A TorchScript or torch.export module as an ordinary one (eval, requires_grad_, to work on it).

    A torch.export module's mode was fixed when it was exported, and a TorchScript module has no
    ``requires_grad_``: the wrapper's ``train``/``eval`` sets its own flag and only a TorchScript
    module's, and ``requires_grad_`` goes through the parameters.
    """

    def __init__(self, module: torch.nn.Module, kind: str):
        super().__init__()
        self.module, self.kind = module, kind

    def train(self, mode: bool = True):
        self.training = mode
        if self.kind == "torchscript":
            self.module.train(mode)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images)


def file_kind(path: str) -> str:
    """``torchscript``, ``export`` or ``file`` (a pickled whole module), from the archive's entries."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return "file"
    if any(n.endswith("/archive_format") for n in names) and any("/models/" in n for n in names):
        return "export"
    if any("/code/" in n for n in names) and any(n.endswith("/constants.pkl") for n in names):
        return "torchscript"
    return "file"


def file_meta(path: str, kind: str) -> dict:
    """The data config stored in a TorchScript or torch.export file (entry ``extra/kdcache.json``)."""
    how = ("torch.jit.save(module, FILE, _extra_files={'kdcache.json': json.dumps(config)})" if kind == "torchscript"
           else "torch.export.save(program, FILE, extra_files={'kdcache.json': json.dumps(config)})")
    with zipfile.ZipFile(path) as archive:
        entries = [n for n in archive.namelist() if n.endswith(f"/extra/{FILE_META_NAME}")]
        if not entries:
            raise ConfigError(f"teacher file {path} carries no {FILE_META_NAME} (its input size, mean and std); save it with {how}")
        text = archive.read(entries[0])
    try:
        meta = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"teacher file {path}: its {FILE_META_NAME} is not JSON ({exc})") from None
    return check_data_config(meta, f"teacher file {path} ({FILE_META_NAME})")


def load_compiled(path: str, kind: str) -> LoadedTeacher:
    meta = file_meta(path, kind)
    try:
        if kind == "torchscript":
            with warnings.catch_warnings():  # TorchScript is deprecated in favour of torch.export; both are read
                warnings.simplefilter("ignore", FutureWarning)
                model = torch.jit.load(path, map_location="cpu")
            name = getattr(model, "original_name", None) or Path(path).name
        else:
            model = torch.export.load(path).module()
            name = Path(path).name
    except Exception as exc:
        raise ConfigError(f"teacher file {path} cannot be loaded as {kind} ({exc.__class__.__name__}: {exc})") from None
    model = CompiledTeacher(model, kind)
    num_classes = probe_classes(model, meta["input_size"], f"teacher file {path}", stated=meta.get("num_classes"))
    return LoadedTeacher(model=model, name=name, source=kind, weights=path, weights_sha256=file_sha256(path),
                         num_classes=num_classes, meta=meta)


def load_pickled(path: str) -> LoadedTeacher:
    try:
        model = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ConfigError(f"teacher file {path} cannot be loaded ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"teacher file {path} holds a {type(model).__name__}, expected a saved torch.nn.Module")
    meta = getattr(model, "pretrained_cfg", None) or {}
    return LoadedTeacher(model=model, name=type(model).__name__, source="file", weights=path,
                         weights_sha256=file_sha256(path), num_classes=_module_classes(model, path), meta=dict(meta))


def _module_classes(model: torch.nn.Module, path: str) -> int:
    if hasattr(model, "num_classes"):
        return int(model.num_classes)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ConfigError(f"teacher file {path}: cannot tell the class count (no num_classes attribute, no Linear layer)")
    return int(linears[-1].out_features)


# --- data configs and the class count ------------------------------------------------------------


def check_data_config(meta, where: str) -> dict:
    """A data config as Python callables and teacher files state it (docs/cli.md), checked and normalised."""
    if not isinstance(meta, dict):
        raise ConfigError(f"{where}: the data config is a {type(meta).__name__}, expected an object")
    unknown = sorted(set(meta) - {"input_size", "mean", "std", "interpolation", "class_names", "num_classes"})
    if unknown:
        raise ConfigError(f"{where}: unknown data config keys {unknown}")
    for key in ("input_size", "mean", "std"):
        if key not in meta:
            raise ConfigError(f"{where}: the data config has no {key!r}")
    size = meta["input_size"]
    size = [3, size, size] if isinstance(size, int) else size
    if not (isinstance(size, (list, tuple)) and len(size) == 3 and all(isinstance(v, int) and v > 0 for v in size)):
        raise ConfigError(f"{where}: input_size {meta['input_size']!r}; expected [channels, height, width] or one size")
    out = {"input_size": list(size), "interpolation": str(meta.get("interpolation", "bilinear"))}
    for key in ("mean", "std"):
        value = meta[key]
        if not (isinstance(value, (list, tuple)) and len(value) == size[0] and all(isinstance(v, (int, float)) for v in value)):
            raise ConfigError(f"{where}: {key} {value!r}; expected {size[0]} numbers")
        out[key] = [float(v) for v in value]
    if meta.get("class_names") is not None:
        out["class_names"] = [str(v) for v in meta["class_names"]]
    if meta.get("num_classes") is not None:
        out["num_classes"] = int(meta["num_classes"])
    return out


@torch.no_grad()
def probe_classes(model: torch.nn.Module, input_size, where: str, *, stated: int | None = None) -> int:
    """The class count, from one forward pass over two blank views of the teacher's input size."""
    model.eval()
    try:
        out = model(torch.zeros(2, *input_size))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ConfigError(f"{where} fails on a batch of two views of size {list(input_size)} ({exc.__class__.__name__}: {first})") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{where}: a batch of two views gives {shape}; expected logits [2, classes]")
    found = int(out.shape[1])
    if stated is not None and stated != found:
        raise MismatchError(f"{where}: its data config says num_classes {stated}, the model gives {found} logits")
    return found
