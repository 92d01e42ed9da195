"""Teachers of every kind: timm, torchvision, a Hugging Face directory, a Python callable, TorchScript, torch.export.

Each kind is made here, tiny and offline, then goes through the CLI: precompute a cache, verify it
100% on the PIL path, train a student from the cache and one with the same teacher live. Bad
teachers (a missing directory, a module without the function, a wrong class count, a file without
its data config) are refused in one line.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path

import pytest
import torch
from cli_checks import invoke, one_error_line

from kdcache.format import open_cache
from kdcache.teacher import MODEL_META_KEY, TeacherConfig, load_teacher, parse_spec
from kdcache.teacher_sources import directory_files, directory_sha256, state_dict_sha256, torchvision_data_config

os.environ["HF_HUB_OFFLINE"] = "1"
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # TorchScript files are made here on purpose

DATA = "digits:val"  # 360 samples
META = {"input_size": [3, 32, 32], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear"}


class TinyNet(torch.nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                                            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.fc = torch.nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


def tiny_net(num_classes: int = 10, seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(num_classes).eval()


#: A module for ``python:FILE:teacher``: the same TinyNet, by its own source, and the data config above.
PYTHON_MODULE = "import torch\n\n\n" + inspect.getsource(TinyNet) + f"""

def teacher():
    torch.manual_seed(0)
    return TinyNet(NUM_CLASSES), {META!r}
"""


def make_timm(folder: Path, num_classes: int = 10) -> list[str]:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=num_classes)
    torch.save({"state_dict": model.state_dict(), MODEL_META_KEY: META}, folder / "timm.pt")
    return ["--teacher", "timm:test_resnet", "--teacher-checkpoint", str(folder / "timm.pt")]


def make_torchvision(folder: Path, num_classes: int = 10) -> list[str]:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model("mobilenet_v3_small", weights=None, num_classes=num_classes)
    torch.save({"state_dict": model.state_dict(), MODEL_META_KEY: META}, folder / "mobilenet.pt")
    return ["--teacher", "torchvision:mobilenet_v3_small", "--teacher-checkpoint", str(folder / "mobilenet.pt")]


def make_hf(folder: Path, num_classes: int = 10) -> list[str]:
    from transformers import AutoModelForImageClassification, ResNetConfig, ViTImageProcessor

    torch.manual_seed(0)
    config = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                          num_labels=num_classes)
    directory = folder / "hf-resnet"
    AutoModelForImageClassification.from_config(config).save_pretrained(directory)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=2).save_pretrained(directory)
    return ["--teacher", f"hf:{directory}"]


def make_python(folder: Path, num_classes: int = 10) -> list[str]:
    path = folder / "my_teacher.py"
    path.write_text(PYTHON_MODULE.replace("NUM_CLASSES", str(num_classes)))
    return ["--teacher", f"python:{path}:teacher"]


def make_torchscript(folder: Path, num_classes: int = 10) -> list[str]:
    path = folder / "teacher.ts"
    torch.jit.save(torch.jit.script(tiny_net(num_classes)), path, _extra_files={"kdcache.json": json.dumps(META)})
    return ["--teacher-file", str(path)]


def make_export(folder: Path, num_classes: int = 10) -> list[str]:
    path = folder / "teacher.pt2"
    program = torch.export.export(tiny_net(num_classes), (torch.zeros(2, 3, 32, 32),),
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    torch.export.save(program, path, extra_files={"kdcache.json": json.dumps(META)})
    return ["--teacher", f"export:{path}"]


KINDS = {"timm": make_timm, "torchvision": make_torchvision, "hf": make_hf, "python": make_python,
         "torchscript": make_torchscript, "export": make_export}
EXPECTED_NAME = {"timm": "test_resnet", "torchvision": "mobilenet_v3_small", "hf": "ResNetForImageClassification",
                 "torchscript": "TinyNet", "export": "teacher.pt2"}


def precompute(out: Path, teacher: list[str], *extra: str, topk: str = "5"):
    return invoke("precompute-logits", "--data", DATA, "--output", out, *teacher, "--epochs", "1", "--topk", topk,
                  "--block-size", "128", "--blocks-per-unit", "2", "--batch-size", "128", *extra)


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_teacher_of_each_kind_precomputes_verifies_and_teaches(tmp_path, kind, one_thread):
    teacher = KINDS[kind](tmp_path)
    cache = tmp_path / "cache"
    result = precompute(cache, teacher, topk="full")  # every logit: the online run below must step alike
    assert result.exit_code == 0, result.output
    t = open_cache(cache).manifest.teacher
    assert (t.source, t.num_classes, t.input_size, t.mean) == (kind, 10, [3, 32, 32], [0.5] * 3)
    assert t.name == EXPECTED_NAME.get(kind, f"{tmp_path / 'my_teacher.py'}:teacher")
    if kind in ("timm", "torchvision", "torchscript", "export"):
        assert t.weights_sha256 == hashlib.sha256(Path(teacher[-1].rpartition(":")[2]).read_bytes()).hexdigest()

    result = invoke("verify", cache, "--data", DATA, *teacher, "--views", "64")
    assert result.exit_code == 0, result.output
    assert "64 view(s) on path pil: 64 match," in result.output and "near-tie" not in result.output
    assert "result       OK" in result.output

    losses = {}
    for name, live in (("cached", []), ("online", teacher)):
        result = invoke("train-student", "--data", DATA, "--cache", cache, "--model", "test_resnet", "--run-dir",
                        tmp_path / name, "--epochs", "1", "--batch-size", "64", "--max-steps", "3", "--log-every", "1", *live)
        assert result.exit_code == 0, result.output
        assert "3 steps in" in result.stderr
        assert "differ" not in result.stderr  # the live teacher is the cache's
        events = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert events[0]["online_teacher"] == bool(live)
        losses[name] = [e["loss"] for e in events if e["kind"] == "train"]
    # The live teacher scores the very views the cache holds (its logits rounded to fp16 as stored, see
    # test_student): the student steps alike either way.
    assert len(losses["cached"]) == 3
    assert losses["online"] == pytest.approx(losses["cached"], rel=1e-3)


# ---- bad teachers: one line, non-zero exit, nothing created --------------------------------------


def test_a_missing_hf_directory_is_one_line(tmp_path):
    line = one_error_line(precompute(tmp_path / "out", ["--teacher", f"hf:{tmp_path / 'nowhere'}"]), 2)
    assert f"teacher directory {tmp_path / 'nowhere'} does not exist" in line
    assert not (tmp_path / "out").exists()


def test_a_directory_that_is_not_a_hf_classifier_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    line = one_error_line(precompute(tmp_path / "out", ["--teacher", f"hf:{tmp_path / 'empty'}"]), 2)
    assert "is not a Hugging Face image classifier" in line


def test_a_module_without_the_function_is_one_line(tmp_path):
    make_python(tmp_path)
    line = one_error_line(precompute(tmp_path / "out", ["--teacher", f"python:{tmp_path / 'my_teacher.py'}:no_such"]), 2)
    assert "has no function 'no_such'" in line
    assert not (tmp_path / "out").exists()


def test_a_module_that_cannot_be_imported_is_one_line(tmp_path):
    line = one_error_line(precompute(tmp_path / "out", ["--teacher", "python:no_such_module_here:teacher"]), 2)
    assert "'no_such_module_here' cannot be imported" in line


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_teacher_with_the_wrong_class_count_is_one_line(tmp_path, kind):
    line = one_error_line(precompute(tmp_path / "out", KINDS[kind](tmp_path, num_classes=7)), 4)
    assert "data digits:val has 10 classes but the teacher has 7" in line
    assert not (tmp_path / "out").exists()


def test_a_wrong_class_count_against_num_classes_is_one_line(tmp_path):
    line = one_error_line(precompute(tmp_path / "out", make_hf(tmp_path), "--num-classes", "7"), 4)
    assert "has 10 classes, but --num-classes says 7" in line


@pytest.mark.parametrize("kind", ["torchscript", "export"])
def test_a_compiled_file_without_its_data_config_is_one_line(tmp_path, kind):
    path = tmp_path / f"bare.{kind}"
    if kind == "torchscript":
        torch.jit.save(torch.jit.script(tiny_net()), path)
    else:
        torch.export.save(torch.export.export(tiny_net(), (torch.zeros(2, 3, 32, 32),)), path)
    line = one_error_line(precompute(tmp_path / "out", ["--teacher-file", str(path)]), 2)
    assert f"teacher file {path} carries no kdcache.json" in line and "extra_files" in line


def test_an_export_with_a_fixed_batch_size_is_one_line(tmp_path):
    path = tmp_path / "fixed.pt2"
    torch.export.save(torch.export.export(tiny_net(), (torch.zeros(5, 3, 32, 32),)), path,
                      extra_files={"kdcache.json": json.dumps(META)})
    line = one_error_line(precompute(tmp_path / "out", ["--teacher", f"export:{path}"]), 2)
    assert "fails on a batch of two views" in line


@pytest.mark.parametrize(("teacher", "named"), [
    (["--teacher", "onnx:model.onnx"], "unknown kind 'onnx'"),
    (["--teacher", "hf:"], "names no hf teacher"),
    (["--teacher", "python:just_a_module"], "expected python:MODULE:FUNCTION"),
    (["--teacher", "torchvision:resnet18:NO_SUCH"], "resnet18 has no weights 'NO_SUCH'; expected one of DEFAULT, IMAGENET1K_V1"),
    (["--teacher", "torchvision:no_such_net", "--teacher-checkpoint", __file__], "not a torchvision model name"),
    (["--teacher", "export:missing.pt2"], "teacher file missing.pt2 does not exist"),
], ids=["kind", "empty", "python-form", "unknown-weights", "unknown-torchvision", "missing-export"])
def test_a_bad_teacher_spec_is_one_line(tmp_path, teacher, named):
    assert named in one_error_line(precompute(tmp_path / "out", teacher), 2)


def test_a_checkpoint_for_a_teacher_that_carries_its_own_weights_is_one_line(tmp_path):
    teacher = make_hf(tmp_path) + ["--teacher-checkpoint", __file__]
    assert "--teacher-checkpoint is for timm and torchvision teachers" in one_error_line(precompute(tmp_path / "out", teacher), 2)


def test_a_torchvision_checkpoint_that_does_not_fit_is_one_line(tmp_path):
    make_timm(tmp_path)
    line = one_error_line(precompute(tmp_path / "out", ["--teacher", "torchvision:mobilenet_v3_small",
                                                        "--teacher-checkpoint", str(tmp_path / "timm.pt")]), 2)
    assert "has no classifier weight classifier.3.weight" in line


# ---- specs, data configs and digests ------------------------------------------------------------


def test_a_bare_name_is_a_timm_teacher():
    assert parse_spec("resnet18") == ("timm", "resnet18")
    assert parse_spec("timm:resnet18") == ("timm", "resnet18")
    assert parse_spec("python:pkg.mod:make") == ("python", "pkg.mod:make")


def test_a_torchvision_teacher_takes_torchvision_s_data_config(tmp_path):
    """Without kdcache metadata in the checkpoint, the input size and normalisation are torchvision's published ones."""
    import torchvision

    torch.save(torchvision.models.get_model("mobilenet_v3_small", weights=None, num_classes=3).state_dict(), tmp_path / "m.pt")
    _, info = load_teacher(TeacherConfig(model="torchvision:mobilenet_v3_small", checkpoint=str(tmp_path / "m.pt")))
    assert (info.num_classes, info.input_size, info.interpolation) == (3, [3, 224, 224], "bilinear")
    assert info.mean == pytest.approx([0.485, 0.456, 0.406]) and info.std == pytest.approx([0.229, 0.224, 0.225])
    assert torchvision_data_config("inception_v3")["input_size"] == [3, 299, 299]


def test_a_python_teacher_imports_by_module_name(tmp_path, monkeypatch):
    make_python(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    model, info = load_teacher(TeacherConfig(model="python:my_teacher:teacher"))
    assert (info.source, info.name, info.checkpoint, info.num_classes) == ("python", "my_teacher:teacher", None, 10)
    assert info.weights_sha256 == state_dict_sha256(model.state_dict())


def test_the_state_dict_digest_is_the_documented_one():
    state = tiny_net().state_dict()
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].contiguous()
        digest.update(f"{key}\0float32\0{','.join(map(str, tensor.shape))}\0".encode())
        digest.update(tensor.numpy().tobytes())
    assert state_dict_sha256(state) == digest.hexdigest()
    assert state_dict_sha256(tiny_net(seed=1).state_dict()) != digest.hexdigest()


def test_the_directory_digest_is_sha256sum_of_its_files(tmp_path):
    make_hf(tmp_path)
    directory = tmp_path / "hf-resnet"
    (directory / ".cache").mkdir()
    (directory / ".cache" / "lock").write_text("ignored")
    names = directory_files(directory)
    assert names == sorted(["config.json", "model.safetensors", "preprocessor_config.json"])
    text = "".join(f"{hashlib.sha256((directory / n).read_bytes()).hexdigest()}  {n}\n" for n in names)
    assert directory_sha256(directory) == hashlib.sha256(text.encode()).hexdigest()
    _, info = load_teacher(TeacherConfig(model=f"hf:{directory}"))
    assert info.weights_sha256 == directory_sha256(directory) and info.checkpoint == str(directory.resolve())


def test_hf_class_names_come_from_its_labels(tmp_path):
    from transformers import AutoModelForImageClassification, ResNetConfig, ViTImageProcessor

    labels = {i: f"digit {i}" for i in range(10)}
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1], layer_type="basic", id2label=labels,
                          label2id={v: k for k, v in labels.items()})
    AutoModelForImageClassification.from_config(config).save_pretrained(tmp_path / "d")
    ViTImageProcessor(size={"height": 24, "width": 24}, resample=3).save_pretrained(tmp_path / "d")
    _, info = load_teacher(TeacherConfig(model=f"hf:{tmp_path / 'd'}"))
    assert info.class_names == [f"digit {i}" for i in range(10)]
    assert (info.input_size, info.interpolation, info.mean) == ([3, 24, 24], "bicubic", [0.5] * 3)


def test_a_teacher_file_is_told_apart_by_its_contents(tmp_path):
    """--teacher-file takes TorchScript, torch.export and pickled modules alike, whatever the file is called."""
    make_torchscript(tmp_path)
    make_export(tmp_path)
    (tmp_path / "teacher.pt2").rename(tmp_path / "exported.bin")
    torch.save(tiny_net(), tmp_path / "pickled.pt")
    sources = {name: load_teacher(TeacherConfig(model_file=str(tmp_path / name)))[1].source
               for name in ("teacher.ts", "exported.bin", "pickled.pt")}
    assert sources == {"teacher.ts": "torchscript", "exported.bin": "export", "pickled.pt": "file"}


def test_hf_data_configs_of_other_processor_shapes():
    """A shortest-edge size, a crop that is not made, and resampling named by PIL's or torchvision's enum."""
    import types

    from torchvision.transforms import InterpolationMode
    from transformers.image_utils import PILImageResampling

    from kdcache.teacher_sources import hf_data_config

    common = dict(image_mean=[0.5] * 3, image_std=[0.25] * 3)
    edge = types.SimpleNamespace(size={"shortest_edge": 40}, crop_size={"height": 36, "width": 36}, do_center_crop=False,
                                 resample=PILImageResampling.BICUBIC, **common)
    assert hf_data_config(edge, "d") == {"input_size": [3, 40, 40], "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bicubic"}
    crop = types.SimpleNamespace(size={"shortest_edge": 40}, crop_size={"height": 36, "width": 36}, do_center_crop=True,
                                 resample=InterpolationMode.BILINEAR, **common)
    assert (hf_data_config(crop, "d")["input_size"], hf_data_config(crop, "d")["interpolation"]) == ([3, 36, 36], "bilinear")
