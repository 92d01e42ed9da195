"""Pretrained teachers through the libraries' own loaders and caches, offline.

A Hugging Face cache is populated as a download leaves it (tests/hub.py) and read with
``HF_HUB_OFFLINE=1``; a server on 127.0.0.1 answering as the Hub does stands in for real
downloads (``HF_ENDPOINT``); torchvision weights come from a ``TORCH_HOME`` the test fills.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import SMALL, cli_command, run_precompute
from hub import COMMIT, TOKEN, FakeHub, cache_snapshot, tiny_timm_files

from kdcache.errors import ConfigError, MismatchError, VerifyError
from kdcache.teacher import TeacherConfig, load_teacher

REPO = "testorg/tiny-resnet"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache that huggingface_hub uses in this process, offline."""
    from huggingface_hub import constants

    path = tmp_path / "hf" / "hub"
    path.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return path


def manifest_of(cache) -> dict:
    return json.loads((cache / "zarr.json").read_text())["attributes"]["kdcache"]


# ---- timm: hf-hub ids and pretrained tags, from the cache ------------------------------------------


def test_hf_hub_teacher_loads_from_the_cache_and_records_repo_commit_and_sha(hub_cache):
    files = tiny_timm_files()
    cache_snapshot(hub_cache, REPO, files)
    model, info = load_teacher(TeacherConfig(model=f"hf-hub:{REPO}"))
    assert (info.source, info.name, info.repo, info.revision) == ("timm", f"hf-hub:{REPO}", REPO, COMMIT)
    assert info.weights_sha256 == hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert info.checkpoint.endswith(f"snapshots/{COMMIT}/model.safetensors")
    assert (info.num_classes, info.input_size, info.mean) == (10, [3, 32, 32], [0.5] * 3)
    # the weights are the file's: the same as timm's own model with that state dict
    import timm
    from safetensors.torch import load

    reference = timm.create_model("test_resnet", pretrained=False, num_classes=10).eval()
    reference.load_state_dict(load(files["model.safetensors"]))
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(images), reference(images))


def test_timm_bare_name_takes_the_default_tag_and_says_which(hub_cache):
    files = tiny_timm_files(num_classes=1000)
    cache_snapshot(hub_cache, "timm/test_resnet.r160_in1k", files)
    said = []
    _, info = load_teacher(TeacherConfig(model="test_resnet"), log=said.append)
    assert said == ["teacher test_resnet: timm's default pretrained tag, test_resnet.r160_in1k"]
    assert (info.name, info.repo, info.revision, info.num_classes) == ("test_resnet.r160_in1k", "timm/test_resnet.r160_in1k",
                                                                         COMMIT, 1000)
    assert info.weights_sha256 == hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert info.class_names[0] == "n01440764"  # ImageNet-1k, named by synset
    _, tagged = load_teacher(TeacherConfig(model=f"timm:test_resnet.r160_in1k@{COMMIT}"), log=said.append)
    assert tagged == info and len(said) == 1


@pytest.mark.parametrize("spec, message", [
    ("test_resnet.nope", r"timm has no pretrained weights for 'test_resnet.nope'; its pretrained tags: test_resnet.r160_in1k"),
    ("no_such_net.a1", r"unknown teacher model 'no_such_net'"),
    (f"hf-hub:{REPO}", r"testorg/tiny-resnet is not in the Hugging Face cache .* HF_HUB_OFFLINE is set"),
    (f"hf-hub:{REPO}@v2", r"testorg/tiny-resnet at revision v2 is not in the Hugging Face cache"),
    ("hf-hub:just-a-name", r"expected hf-hub:ORG/NAME"),
    ("resnet18@a@b", r"expected one @REVISION"),
])
def test_bad_pretrained_specs_are_one_line(hub_cache, spec, message):
    with pytest.raises(ConfigError, match=message) as caught:
        load_teacher(TeacherConfig(model=spec), log=lambda line: None)
    assert "\n" not in str(caught.value)


def test_checkpoint_still_overrides_and_cannot_name_published_weights(teacher_ckpt):
    _, info = load_teacher(TeacherConfig(model="test_resnet", checkpoint=str(teacher_ckpt)))
    assert (info.repo, info.revision) == (None, None)
    with pytest.raises(ConfigError, match="names published weights"):
        TeacherConfig(model=f"hf-hub:{REPO}", checkpoint=str(teacher_ckpt))


# ---- torchvision: weights enums through torch.hub's cache -------------------------------------------


def test_torchvision_weights_enum_from_torch_home(tmp_path, monkeypatch):
    import torchvision
    from torchvision.models import SqueezeNet1_1_Weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    weights = SqueezeNet1_1_Weights.IMAGENET1K_V1
    path = tmp_path / "torch" / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[1]
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.squeezenet1_1().state_dict(), path)  # as a download leaves it, other numbers
    said = []
    model, info = load_teacher(TeacherConfig(model="torchvision:squeezenet1_1"), log=said.append)
    assert said == ["teacher torchvision:squeezenet1_1: the DEFAULT weights are IMAGENET1K_V1"]
    assert (info.source, info.name, info.num_classes) == ("torchvision", "squeezenet1_1", 1000)
    assert (info.repo, info.revision) == (weights.url, "SqueezeNet1_1_Weights.IMAGENET1K_V1")
    assert info.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    transforms = weights.transforms()  # the weights' own transforms
    assert (info.input_size, info.mean, info.std) == ([3, 224, 224], list(transforms.mean), list(transforms.std))
    assert info.class_names[0] == weights.meta["categories"][0]
    torch.testing.assert_close(model.state_dict()["classifier.1.weight"], torch.load(path)["classifier.1.weight"])
    _, named = load_teacher(TeacherConfig(model="torchvision:squeezenet1_1:IMAGENET1K_V1"))
    assert named == info


# ---- transformers: hf:ORG/NAME from the Hub cache ---------------------------------------------------


def test_hf_repository_from_the_cache_records_repo_commit_and_weights_sha(hub_cache, tmp_path):
    from test_teacher_sources import make_hf

    directory = make_hf(tmp_path)[1].removeprefix("hf:")
    files = {path.name: path.read_bytes() for path in sorted(Path(directory).iterdir()) if path.is_file()}
    assert {"config.json", "preprocessor_config.json", "model.safetensors"} <= set(files)
    cache_snapshot(hub_cache, "testorg/hf-resnet", files)
    model, info = load_teacher(TeacherConfig(model="hf:testorg/hf-resnet"))
    _, local = load_teacher(TeacherConfig(model=f"hf:{directory}"))
    assert (info.source, info.repo, info.revision) == ("hf", "testorg/hf-resnet", COMMIT)
    assert info.weights_sha256 == hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert (info.num_classes, info.input_size, info.mean) == (local.num_classes, local.input_size, local.mean)
    assert (local.repo, local.revision) == (None, None)  # a local directory is what it was
    with pytest.raises(ConfigError, match=r"testorg/hf-resnet at revision v1 is not in the Hugging Face cache"):
        load_teacher(TeacherConfig(model="hf:testorg/hf-resnet@v1"))
    with pytest.raises(ConfigError, match=r"teacher directory no/such/dir does not exist \(nor is it a Hub id"):
        TeacherConfig(model="hf:no/such/dir")


def test_damaged_weights_in_a_library_cache_are_one_line(hub_cache, tmp_path, monkeypatch):
    cache_snapshot(hub_cache, "timm/test_resnet.r160_in1k", tiny_timm_files(num_classes=10))  # not the tag's 1000 classes
    with pytest.raises(ConfigError, match=r"teacher test_resnet.r160_in1k: the weights file .*model.safetensors of "
                                          r"timm/test_resnet.r160_in1k does not load into test_resnet.r160_in1k") as caught:
        load_teacher(TeacherConfig(model="test_resnet.r160_in1k"))
    assert "\n" not in str(caught.value)
    from torchvision.models import SqueezeNet1_1_Weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = tmp_path / "torch" / "hub" / "checkpoints" / SqueezeNet1_1_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
    path.parent.mkdir(parents=True)
    path.write_bytes(b"half a download")
    with pytest.raises(ConfigError, match=r"teacher torchvision:squeezenet1_1:IMAGENET1K_V1: cannot load .* remove it to download"):
        load_teacher(TeacherConfig(model="torchvision:squeezenet1_1:IMAGENET1K_V1"))


# ---- the pinned revision: precompute, verify, and a teacher of another revision ----------------


def test_cache_pins_the_revision_and_verify_loads_it(hub_cache, tmp_path):
    from kdcache.precompute import PrecomputeConfig
    from kdcache.verify import VerifyConfig, verify_cache

    files = tiny_timm_files()
    cache_snapshot(hub_cache, REPO, files)
    out = tmp_path / "cache"
    config = PrecomputeConfig(output=str(out), teacher=TeacherConfig(model=f"hf-hub:{REPO}"), command="pytest",
                              **{**SMALL, "epochs": 1})
    run_precompute(config)
    teacher = manifest_of(out)["teacher"]
    assert (teacher["repo"], teacher["revision"]) == (REPO, COMMIT)
    assert teacher["weights_sha256"] == hashlib.sha256(files["model.safetensors"]).hexdigest()

    # main moves on to other weights: verify without @REVISION still loads the cache's commit
    cache_snapshot(hub_cache, REPO, tiny_timm_files(seed=1), commit=OTHER)
    verify_cache(VerifyConfig(cache=str(out), data="digits", teacher=TeacherConfig(model=f"hf-hub:{REPO}"), views=8),
                 log=lambda line: None)
    # and --resume extends the cache with the cache's commit, not main's
    run_precompute(dataclasses.replace(config, epochs=2, resume=True))
    assert manifest_of(out)["epochs"] == 2 and manifest_of(out)["teacher"]["revision"] == COMMIT
    # a team elsewhere reads which weights these are
    from kdcache.info import cache_info, format_info

    text = format_info(cache_info(str(out)))
    assert f"published {REPO} at revision {COMMIT}" in text
    # naming the other revision is refused in one line, before any view is scored
    with pytest.raises(MismatchError, match=f"revision {OTHER} of {REPO}, but the cache was made with revision {COMMIT}"):
        verify_cache(VerifyConfig(cache=str(out), data="digits", teacher=TeacherConfig(model=f"hf-hub:{REPO}@{OTHER}"),
                                  views=8), log=lambda line: None)
    # and so is an online baseline (train-student --teacher) of the other revision, before any step
    from kdcache.losses import LossConfig
    from kdcache.student import StudentConfig, train_student

    with pytest.raises(MismatchError, match=f"but the cache was made with revision {COMMIT}"):
        train_student(StudentConfig(data="digits", model="test_resnet", run_dir=str(tmp_path / "run"), cache=str(out),
                                    teacher=TeacherConfig(model=f"hf-hub:{REPO}@{OTHER}"), loss=LossConfig(name="kd"),
                                    epochs=1, max_steps=1), log=lambda line: None)


def test_an_added_teacher_from_the_hub_records_its_repo_and_commit(hub_cache, cache_copy):
    from kdcache.add_teacher import AddTeacherConfig, add_teacher
    from kdcache.info import cache_info

    cache, _ = cache_copy
    files = tiny_timm_files(seed=3)
    cache_snapshot(hub_cache, REPO, files)
    add_teacher(AddTeacherConfig(cache=str(cache), data="digits", teacher=TeacherConfig(model=f"hf-hub:{REPO}"),
                                 name="hub"), log=lambda line: None)
    group = json.loads((cache / "teachers" / "hub" / "zarr.json").read_text())["attributes"]["kdcache_teacher"]
    assert (group["teacher"]["repo"], group["teacher"]["revision"]) == (REPO, COMMIT)
    assert group["teacher"]["weights_sha256"] == hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert [t["weights_sha256"] for t in cache_info(str(cache))["teachers"]] == [group["teacher"]["weights_sha256"]]
    assert not {"repo", "revision"} & set(manifest_of(cache)["teacher"])  # the root's teacher is as it was
    # main moves on: verify of every teacher's records still loads the added teacher's commit and passes
    from kdcache.verify import VerifyConfig, verify_cache

    cache_snapshot(hub_cache, REPO, tiny_timm_files(seed=4), commit=OTHER)
    verify_cache(VerifyConfig(cache=str(cache), data="digits", teacher=TeacherConfig(model=f"hf-hub:{REPO}"), views=4),
                 log=lambda line: None)


def test_manifest_of_a_checkpoint_teacher_has_no_repo_fields(small_cache):
    assert not {"repo", "revision"} & set(manifest_of(small_cache)["teacher"])


def test_cli_reads_the_cache_hf_home_names(tmp_path, subprocess_env):
    cache_snapshot(tmp_path / "hf" / "hub", REPO, tiny_timm_files())
    env = {**subprocess_env, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "cache"
    result = subprocess.run(cli_command() + ["precompute-logits", "--data", "digits", "--teacher", f"hf-hub:{REPO}",
                                             "--epochs", "1", "--topk", "3", "--output", str(out)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    teacher = manifest_of(out)["teacher"]
    assert (teacher["name"], teacher["repo"], teacher["revision"]) == (f"hf-hub:{REPO}", REPO, COMMIT)
    assert teacher["checkpoint"].startswith(str(tmp_path / "hf" / "hub"))


def test_cli_without_network_and_nothing_cached_is_one_line_and_creates_nothing(tmp_path, subprocess_env):
    env = {**subprocess_env, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "cache"
    result = subprocess.run(cli_command() + ["precompute-logits", "--data", "digits", "--teacher", "resnet18.a1_in1k",
                                             "--epochs", "1", "--output", str(out)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "timm/resnet18.a1_in1k is not in the Hugging Face cache" in errors[0], result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


# ---- a Hub on 127.0.0.1: a real download, a wrong revision, a gated repository, a dropped connection


@pytest.fixture
def fake_hub(hub_cache, monkeypatch):
    from huggingface_hub import constants

    with FakeHub() as hub:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
        yield hub


def test_download_from_a_hub_fills_the_cache_with_progress(fake_hub, hub_cache):
    from huggingface_hub.utils import are_progress_bars_disabled

    files = tiny_timm_files()
    fake_hub.repos[REPO] = {"files": files, "commit": COMMIT}
    _, info = load_teacher(TeacherConfig(model=f"hf-hub:{REPO}"))
    assert (info.repo, info.revision) == (REPO, COMMIT)
    assert info.weights_sha256 == hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert (hub_cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT / "model.safetensors").is_file()
    assert any(path.endswith("model.safetensors") for _, path, _ in fake_hub.requests)
    assert not are_progress_bars_disabled()  # the download shows its own bar (on a terminal, as huggingface_hub decides)


def test_wrong_revision_is_one_line(fake_hub):
    fake_hub.repos[REPO] = {"files": tiny_timm_files(), "commit": COMMIT}
    with pytest.raises(ConfigError, match=f"the Hub repository {REPO} has no revision 'v9'"):
        load_teacher(TeacherConfig(model=f"hf-hub:{REPO}@v9"))


def test_gated_repository_without_a_token_then_with_one(fake_hub, monkeypatch):
    fake_hub.repos[REPO] = {"files": tiny_timm_files(), "commit": COMMIT, "gated": True}
    with pytest.raises(ConfigError, match=f"the Hub repository {REPO} is gated: .* set HF_TOKEN"):
        load_teacher(TeacherConfig(model=f"hf-hub:{REPO}"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    _, info = load_teacher(TeacherConfig(model=f"hf-hub:{REPO}"))
    assert info.revision == COMMIT
    assert TOKEN not in json.dumps(info.__dict__)
    assert any(auth == f"Bearer {TOKEN}" for _, _, auth in fake_hub.requests)


def test_unknown_repository_is_one_line(fake_hub):
    with pytest.raises(ConfigError, match="no repository testorg/missing on the Hub"):
        load_teacher(TeacherConfig(model="hf-hub:testorg/missing"))


def test_connection_dropped_mid_download_is_one_line_and_a_rerun_completes(fake_hub, hub_cache):
    files = tiny_timm_files()
    fake_hub.repos[REPO] = {"files": files, "commit": COMMIT}
    fake_hub.drop.add("model.safetensors")
    with pytest.raises(ConfigError, match=f"downloading {REPO} at revision {COMMIT} failed .*run the command again") as caught:
        load_teacher(TeacherConfig(model=f"hf-hub:{REPO}"))
    assert "\n" not in str(caught.value)
    fake_hub.drop.clear()
    _, info = load_teacher(TeacherConfig(model=f"hf-hub:{REPO}"))
    assert info.weights_sha256 == hashlib.sha256(files["model.safetensors"]).hexdigest()
