"""The device replay path on real photos: exact for itself, close to torchvision, and counted where it falls back.

The photos are ``benchmarks/photos.py``'s: crops of scikit-learn's two sample photos as JPEGs
at 300-500 px, plus one file of each kind the GPU decoder does not take. Everything here runs on
CPU tensors, the same code as on CUDA.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from kdcache import CacheLoader, open_cache
from kdcache.augment import DEFAULT_RANDAUG_OPS, PRESETS, AugSpec, cache_spec, preset, sample_view_params
from kdcache.errors import ConfigError, FormatError, SourceError, VerifyError
from kdcache.replay import EncodedImages, replay_block, replay_fingerprint, replay_pending
from kdcache.sources import Sample, decode_on_device, decode_sample, image_header, open_source
from kdcache.teacher import TeacherConfig
from kdcache.verify import VerifyConfig, verify_cache
from kdcache_cli.main import app

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """30 photo JPEGs of two classes, and one PNG, palette PNG, 16-bit PNG and CMYK JPEG."""
    out = tmp_path_factory.mktemp("photos")
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "photos.py"), "--out", str(out), "--count", "30",
                    "--odd", "1", "--photos", "sklearn"], check=True, capture_output=True)
    return out / "images"


@pytest.fixture(scope="module")
def decoded(photos):
    source = open_source(f"imagefolder:{photos}")
    samples = source.read(range(len(source)))
    return samples, [decode_sample(s) for s in samples]


def specs():
    """Every preset, colour jitter, and each RandAugment op alone (applied twice, at spread magnitudes)."""
    found = {name: preset(name, output_size=48, mean=(0.5,) * 3, std=(0.5,) * 3) for name in PRESETS}
    found["jitter"] = AugSpec(output_size=48, hflip=0.5, color_jitter=0.4)
    for op in DEFAULT_RANDAUG_OPS:
        found[op] = AugSpec(output_size=48, randaug_n=2, randaug_prob=1.0, randaug_ops=(op,), randaug_mstd=3.0)
    return found


SPECS = specs()


def params_of(spec, images, seed=1):
    return sample_view_params(spec, seed=seed, epoch=0, block_id=0, sample_ids=np.arange(len(images)),
                              image_sizes=[(img.height, img.width) for img in images])


def uint8_views(spec, params, images, path, positions=None):
    pending = replay_pending(spec, params, images, positions=positions, path=path)
    return pending.realize(spec).base if path == "device" else pending.base


@pytest.mark.parametrize("name", list(SPECS))
def test_a_view_is_the_same_tensor_in_any_batch(decoded, name):
    spec = SPECS[name]
    _, images = decoded
    params = params_of(spec, images)
    whole = replay_block(spec, params, images, path="device")
    rng = np.random.default_rng(0)
    for size in (1, 5, 11):
        positions = np.sort(rng.choice(len(images), size=size, replace=False))
        part = replay_block(spec, params, images, positions=positions, path="device")
        torch.testing.assert_close(part, whole[positions], rtol=0, atol=0)
    again = replay_block(spec, params, images, path="device")
    torch.testing.assert_close(again, whole, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(SPECS))
def test_device_ops_compute_what_torchvisions_tensor_ops_compute(decoded, name):
    """Equal but where torchvision fuses a multiply and an add: at most 2 levels, in under 2% of the pixels."""
    spec = SPECS[name]
    _, images = decoded
    params = params_of(spec, images)
    device = uint8_views(spec, params, images, "device")
    tensor = uint8_views(spec, params, images, "tensor")
    diff = (device.int() - tensor.int()).abs()
    assert diff.max().item() <= 2 and (diff > 0).float().mean().item() < 0.02, (diff.max(), (diff > 0).float().mean())
    if name in ("none", "light", "funmatch", "cutmix", "Brightness", "Posterize", "Solarize", "Invert", "Equalize"):
        assert torch.equal(device, tensor)  # no fused arithmetic in these: the same pixels


def test_the_device_decoder_takes_jpegs_and_counts_what_it_leaves_to_the_host(photos, decoded):
    samples, images = decoded
    headers = [image_header(s) for s in samples]
    extra = []
    for kind, save in (("progressive", dict(format="JPEG", progressive=True)), ("gray", dict(format="JPEG"))):
        buffer = io.BytesIO()
        (images[0].convert("L") if kind == "gray" else images[0]).save(buffer, **save)
        extra.append(Sample(key=kind, label=0, data=buffer.getvalue()))
    samples = list(samples) + extra
    headers += [image_header(s) for s in extra]
    counts = Counter()
    out = decode_on_device(samples, headers, "cpu", counts)
    assert counts == Counter({"device": 32, "host png RGB": 1, "host png P": 1, "host png I;16": 1, "host jpeg CMYK": 1})
    for sample, header, tensor in zip(samples, headers, out):
        assert tensor.dtype == torch.uint8 and tuple(tensor.shape) == (3, header.height, header.width)
        if not header.device_decodable:  # the host decodes it as the pil path does
            want = torch.from_numpy(np.array(decode_sample(sample))).permute(2, 0, 1)
            assert torch.equal(tensor, want)


def test_headers_give_the_sizes_without_decoding_and_name_a_sample_that_is_no_image():
    good = io.BytesIO()
    Image.new("RGB", (37, 21)).save(good, format="JPEG")
    images = EncodedImages([Sample(key="a", label=0, data=good.getvalue())])
    assert images.sizes() == [(21, 37)] and images.headers[0].device_decodable
    with pytest.raises(Exception, match="sample 'b': cannot decode image"):
        image_header(Sample(key="b", label=0, data=b"<html>not found</html>"))


@pytest.mark.parametrize("kept", [0.5, 0.9])
def test_a_truncated_jpeg_goes_to_the_host_decoder_which_refuses_it_naming_its_sample(kept):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    data = buffer.getvalue()
    sample = Sample(key="cut", label=0, data=data[: int(len(data) * kept)])
    header = image_header(sample)
    assert (header.format, header.ended, header.device_decodable) == ("jpeg", False, False)
    with pytest.raises(SourceError, match="sample 'cut': cannot decode image"):
        decode_on_device([sample], [header], "cpu")


# ---- a cache on the device path, end to end ------------------------------------------------------


@pytest.fixture(scope="module")
def device_cache(tmp_path_factory, photos, make_teacher):
    """A strong-augmentation cache of the photos made on the device path (blocks of 8, 2 epochs)."""
    from kdcache.precompute import PrecomputeConfig, precompute_logits
    from threads import single_thread

    out = tmp_path_factory.mktemp("device-cache") / "cache"
    teacher = TeacherConfig(model="test_resnet", checkpoint=str(make_teacher(num_classes=2)))
    config = PrecomputeConfig(data=f"imagefolder:{photos}", output=str(out), teacher=teacher, augmentation="strong",
                              epochs=2, topk=2, block_size=8, blocks_per_unit=2, batch_size=16, replay_path="device",
                              command="pytest")
    with single_thread():
        result = precompute_logits(config, log=lambda line: None)
    return out, teacher, result


def test_a_device_path_cache_records_its_path_and_counts_its_decoding(device_cache):
    out, _, result = device_cache
    m = open_cache(out).manifest
    assert m.replay == replay_fingerprint("device", "cpu")
    assert (m.replay["device"], m.replay["decoder"]) == ("cpu", "libjpeg-turbo")
    assert result.decoded == {"device": 60, "host png RGB": 2, "host png P": 2, "host png I;16": 2, "host jpeg CMYK": 2}


def test_a_device_path_cache_verifies_every_view_on_its_path(device_cache, photos):
    out, teacher, _ = device_cache
    report = verify_cache(VerifyConfig(cache=str(out), data=f"imagefolder:{photos}", teacher=teacher, views=68),
                          log=lambda line: None)
    assert report.ok and report.views_checked == 68 and report.max_abs_diff == 0.0
    assert "68 match, max |diff| 0" in report.format()


def test_verify_on_the_pil_path_reports_the_agreement_as_figures(device_cache, photos):
    out, teacher, _ = device_cache
    lines = []
    try:
        report = verify_cache(VerifyConfig(cache=str(out), data=f"imagefolder:{photos}", teacher=teacher, views=68,
                                           replay_path="pil"), log=lines.append)
        text = report.format()
    except VerifyError:
        text = lines[-1]
    replay = next(line for line in text.splitlines() if line.strip().startswith("replay"))
    assert "on path pil (cache made with device)" in replay
    match = float(replay.split(" match (")[1].split("%")[0])
    top1 = float(replay.split("top-1 agreement ")[1].split("%")[0])
    assert 0 <= match <= 100 and top1 >= 90.0  # tiny pixel differences rarely move the top class


def test_the_students_views_are_the_teachers_views(device_cache, photos):
    out, _, _ = device_cache
    cache = open_cache(out)
    m, spec = cache.manifest, cache_spec(cache.manifest)
    source = open_source(f"imagefolder:{photos}")
    plan = cache.samples()
    loader = CacheLoader(str(out), f"imagefolder:{photos}", batch_size=6, seed=4)
    assert loader.replay_path == "device"
    checked = 0
    for epoch in (0, 1):
        for batch in loader.epoch(epoch):
            for view, image in zip(batch.views.tolist(), batch.images):
                cache_epoch, slot = view
                block, position = divmod(slot, m.blocks.block_capacity)
                members = plan["source_index"][m.blocks.block_slots(block)]
                samples = source.read(members)
                want = replay_block(spec, cache.read_block(cache_epoch, block)["params"], EncodedImages(samples),
                                    positions=[position], path="device")[0]
                torch.testing.assert_close(image, want, rtol=0, atol=0)
                checked += 1
    assert checked == 2 * (34 // 6) * 6
    assert sum(loader.decoded.values()) > 0 and "host jpeg CMYK" in loader.decoded


@pytest.mark.slow
def test_train_student_on_the_device_path_says_where_it_decoded(device_cache, photos, tmp_path):
    out, _, _ = device_cache
    for workers in (0, 2):
        run_dir = tmp_path / f"run-{workers}"
        result = CliRunner().invoke(app, ["train-student", "--cache", str(out), "--data", f"imagefolder:{photos}",
                                          "--model", "test_resnet", "--run-dir", str(run_dir), "--epochs", "1",
                                          "--batch-size", "8", "--workers", str(workers)])
        assert result.exit_code == 0, result.output
        line = next(line for line in result.output.splitlines() if "decoded on cpu" in line)
        assert "on the host" in line and "jpeg CMYK" in line
        events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        decoded = next(e for e in events if e.get("kind") == "decoded")
        assert decoded["device"] > 0


def test_a_pil_cache_trained_on_the_device_path_is_said_to_differ(tmp_path, photos, make_teacher, helpers):
    from kdcache.precompute import PrecomputeConfig

    teacher = TeacherConfig(model="test_resnet", checkpoint=str(make_teacher(num_classes=2)))
    out = tmp_path / "pil"
    helpers.run_precompute(PrecomputeConfig(data=f"imagefolder:{photos}", output=str(out), teacher=teacher, epochs=1,
                                            topk=2, block_size=8, blocks_per_unit=2, batch_size=16, command="pytest"))
    result = CliRunner().invoke(app, ["train-student", "--cache", str(out), "--data", f"imagefolder:{photos}", "--model",
                                      "test_resnet", "--run-dir", str(tmp_path / "run"), "--epochs", "1", "--batch-size",
                                      "8", "--replay-path", "device", "--max-steps", "1"])
    assert result.exit_code == 0, result.output
    assert "replaying on path device; the cache's teacher saw path pil" in result.output


# ---- bad input ----------------------------------------------------------------------------------


def test_an_unknown_replay_path_is_one_line_everywhere(device_cache, photos, tmp_path):
    out, _, _ = device_cache
    result = CliRunner().invoke(app, ["train-student", "--cache", str(out), "--data", f"imagefolder:{photos}", "--model",
                                      "test_resnet", "--run-dir", str(tmp_path / "run"), "--replay-path", "gpu"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "error: --replay-path 'gpu'; expected one of pil, tensor, device" in result.output
    with pytest.raises(ConfigError, match="replay_path='gpu'"):
        CacheLoader(str(out), f"imagefolder:{photos}", batch_size=4, replay_path="gpu")


def _edit_replay(cache_dir: Path, **changes) -> None:
    meta = cache_dir / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["kdcache"]["replay"].update(changes)
    meta.write_text(json.dumps(doc))


def test_a_device_path_manifest_must_say_where_it_ran(device_cache, tmp_path):
    import shutil

    out, _, _ = device_cache
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    _edit_replay(copy, device="tpu")
    with pytest.raises(FormatError, match="replay.device = 'tpu'; expected 'cpu' or 'cuda'"):
        open_cache(copy)


def test_batches_moved_ahead_in_a_thread_are_the_batches_moved_inline(device_cache, photos):
    """What CUDA does (the next batch decoded and replayed in a thread while this one is used), run on the CPU."""
    from kdcache.batch import batches_on_device

    out, _, _ = device_cache
    loader = CacheLoader(str(out), f"imagefolder:{photos}", batch_size=6, seed=2)
    inline = list(batches_on_device(loader._loader.epoch_batches(1, 0), "cpu", ahead=False))
    ahead = list(batches_on_device(loader._loader.epoch_batches(1, 0), "cpu", ahead=True))
    assert len(inline) == len(ahead) == 34 // 6
    for want, got in zip(inline, ahead):
        assert got.pending is None and got.decoded == want.decoded and sum(got.decoded.values()) > 0
        for a, b in zip(want.tensors(), got.tensors(), strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
        assert torch.equal(got.views, want.views)


def test_workers_read_device_path_blocks_and_a_thread_decodes_them_ahead(device_cache, photos):
    """precompute with --workers on a GPU: workers keep the views encoded, the parent's thread realizes them."""
    from types import SimpleNamespace

    from kdcache.precompute import BlockPreparer, _prepared

    out, _, _ = device_cache
    cache = open_cache(out)
    m = cache.manifest
    source = open_source(f"imagefolder:{photos}")
    preparer = BlockPreparer(SimpleNamespace(data=f"imagefolder:{photos}"), source, m, cache.samples())
    jobs = [(1, unit, block) for unit in range(m.blocks.num_units) for block in m.blocks.unit_blocks(unit)]
    preparer.device = torch.device("cpu")  # as precompute sets it without workers
    inline = list(_prepared(preparer, iter(jobs), 0, "cpu", overlap=False))
    assert sum(preparer.counts.values()) == 34
    preparer.device = None  # as with workers: they read the blocks, this process realizes them on "cpu"
    ahead = list(_prepared(preparer, iter(jobs), 1, "cpu", overlap=True))
    assert sum(preparer.counts.values()) == 2 * 34  # decoded here, not in the worker (whose counts stay there)
    assert [job for job, _, _ in ahead] == jobs
    for (_, want, want_params), ((_, _, block), got, got_params) in zip(inline, ahead, strict=True):
        assert got.base is not None and len(got) == len(want)
        torch.testing.assert_close(got.base, want.base, rtol=0, atol=0)
        stored = cache.read_block(1, block)["params"]
        assert np.array_equal(np.asarray(got_params), np.asarray(want_params))
        assert np.array_equal(np.asarray(got_params), stored[: len(got_params)])  # the views the teacher scored


def test_resuming_a_device_path_cache_on_another_device_is_refused(device_cache, photos, tmp_path):
    import shutil

    out, teacher, _ = device_cache
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    _edit_replay(copy, device="cuda", decoder="nvjpeg")
    result = CliRunner().invoke(app, ["precompute-logits", "--data", f"imagefolder:{photos}", "--output", str(copy),
                                      "--teacher", "test_resnet", "--teacher-checkpoint", teacher.checkpoint,
                                      "--augmentation", "strong", "--epochs", "3", "--topk", "2", "--block-size", "8",
                                      "--blocks-per-unit", "2", "--batch-size", "16", "--replay-path", "device", "--resume"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "cannot resume: replay.device differs: the cache has 'cuda', this run has 'cpu'" in result.output


def test_an_added_teacher_records_the_device_its_views_were_replayed_on(device_cache, photos, tmp_path):
    """A cache made on a GPU, a teacher added on the CPU: the group says cpu, verifies on the CPU, and is
    refused to a run on another device than its own."""
    import shutil

    out, teacher, _ = device_cache
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    _edit_replay(copy, device="cuda", decoder="nvjpeg")  # as a cache made on a GPU says
    add = ["add-teacher", str(copy), "--data", f"imagefolder:{photos}", "--teacher", "test_resnet",
           "--teacher-checkpoint", teacher.checkpoint, "--name", "second"]
    result = CliRunner().invoke(app, add)
    assert result.exit_code == 0, result.output
    group = json.loads((copy / "teachers" / "second" / "zarr.json").read_text())["attributes"]["kdcache_teacher"]
    assert (group["replay"]["path"], group["replay"]["device"], group["replay"]["decoder"]) == ("device", "cpu", "libjpeg-turbo")
    cache = open_cache(copy)
    report = verify_cache(VerifyConfig(cache=str(copy), data=f"imagefolder:{photos}", teacher=teacher, views=20,
                                       teacher_record="second"), log=lambda line: None)
    assert report.ok and report.views_checked == 20 and report.max_abs_diff == 0.0 and report.replay_path == "device"
    assert cache.manifest.replay["device"] == "cuda"  # the root's own record is untouched

    group_dir = copy / "teachers" / "second"
    doc = json.loads((group_dir / "zarr.json").read_text())
    doc["attributes"]["kdcache_teacher"]["replay"].update(device="cuda", decoder="nvjpeg")  # as if added on a GPU
    (group_dir / "zarr.json").write_text(json.dumps(doc))
    lines = []  # what an older kdcache wrote for a teacher added on the CPU: the root's device; it still opens and verifies
    report = verify_cache(VerifyConfig(cache=str(copy), data=f"imagefolder:{photos}", teacher=teacher, views=20,
                                       teacher_record="second"), log=lines.append)
    assert report.ok and report.replay_path == "device on cpu (cache made on cuda)"
    assert "20 view(s) on path device on cpu (cache made on cuda): 20 match (100.0%), top-1 agreement 100.0%" in lines[-1]
    before = {p: p.read_bytes() for p in sorted(group_dir.rglob("*")) if p.is_file()}
    result = CliRunner().invoke(app, add)  # run again, it joins the group
    assert result.exit_code != 0 and "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert ("the teacher records 'second' were replayed on the device path on cuda, this run would replay on cpu"
            in result.output)
    assert {p: p.read_bytes() for p in sorted(group_dir.rglob("*")) if p.is_file()} == before


def test_a_truncated_jpeg_stops_a_device_path_precompute_naming_it(photos, tmp_path, make_teacher):
    import shutil

    images = tmp_path / "images"
    shutil.copytree(photos, images)
    source = open_source(f"imagefolder:{images}")
    out = tmp_path / "cache"
    argv = ["precompute-logits", "--data", f"imagefolder:{images}", "--output", str(out), "--teacher", "test_resnet",
            "--teacher-checkpoint", str(make_teacher(num_classes=2)), "--epochs", "1", "--topk", "2", "--block-size", "8",
            "--blocks-per-unit", "1", "--batch-size", "16", "--replay-path", "device"]
    assert CliRunner().invoke(app, argv + ["--max-units", "0"]).exit_code == 7  # the plan only: which block is last
    cache = open_cache(out)
    m = cache.manifest
    last = m.blocks.num_blocks - 1
    key = next(str(k) for k in cache.samples()["key"][m.blocks.block_slots(last)] if not str(k).split("/")[1].startswith("odd"))
    path = next(images.glob(f"{key}.jpg"))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    shutil.rmtree(out)
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    error = next(line for line in result.output.splitlines() if line.startswith("error: "))
    assert f"sample '{key}': cannot decode image" in error and f"block {last}" in error, error
    assert len(open_cache(out).ledger) == last  # the units before it are committed and kept


def test_show_renders_a_device_path_cache_as_scored(device_cache, photos, tmp_path):
    out, _, _ = device_cache
    result = CliRunner().invoke(app, ["show", str(out), "--data", f"imagefolder:{photos}", "--epoch", "1", "--count", "4",
                                      "--out", str(tmp_path / "views.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "views.png").stat().st_size > 0


def test_one_view_alone_is_its_view_in_the_block(decoded):
    from kdcache.replay import replay_uint8

    spec = SPECS["strong"]
    _, images = decoded
    params = params_of(spec, images)
    block = uint8_views(spec, params, images, "device")
    for position in (0, 7, 19):
        torch.testing.assert_close(replay_uint8(spec, params[position], images[position], path="device"), block[position],
                                   rtol=0, atol=0)
