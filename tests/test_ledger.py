"""The ledger at scale: epoch indexes (written, preferred, checked against the entries), caches of the
previous layout, `kdcache index`, the size from the ledger, and the requests a reader makes over http."""

from __future__ import annotations

import functools
import http.server
import json
import re
import shutil
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from kdcache.augment import preset
from kdcache.errors import ChecksumError, FormatError, IncompleteCacheError
from kdcache.export import ExportConfig, export_cache
from kdcache.format import COMPRESSION, FORMAT_VERSION, BlockLayout, CacheWriter, DatasetInfo, Manifest, TeacherInfo, ledger_key, open_cache
from kdcache.format.ledger import epoch_index_bytes, epoch_index_key, index_cache, write_epoch_index
from kdcache.info import cache_info
from kdcache.merge import merge_caches
from cli_checks import invoke, one_error_line, quiet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def indexed(small_cache, tmp_path) -> Path:
    """A copy of small_cache, whose two epochs precompute indexed as each became complete."""
    path = Path(shutil.copytree(small_cache, tmp_path / "indexed"))
    assert index_cache(path, log=quiet) == {"written": [], "rewritten": [], "unchanged": [0, 1], "incomplete": []}
    return path


@pytest.fixture
def plain(small_cache, tmp_path) -> Path:
    """A copy of small_cache in the previous layout: no epoch index."""
    path = Path(shutil.copytree(small_cache, tmp_path / "plain"))
    shutil.rmtree(path / "ledger" / "epochs")
    return path


def disk_size(path: Path) -> tuple[int, int]:
    files = [p for p in Path(path).rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


# ---- the epoch index ------------------------------------------------------------------------------


def test_readers_prefer_the_epoch_index_and_see_the_same_ledger_and_digest(plain, indexed):
    plain, fast = open_cache(plain), open_cache(indexed)
    assert plain.indexed_epochs() == [] and fast.indexed_epochs() == [0, 1]
    assert fast.ledger == plain.ledger
    assert fast.digest() == plain.digest()  # the previous layout (no index files) names the same content
    index = json.loads((indexed / epoch_index_key(1)).read_bytes())
    assert (index["kind"], index["version"], index["epoch"]) == ("kdcache-epoch-index", 1, 1)
    assert [e["unit"] for e in index["entries"]] == [0, 1, 2]
    assert index["ledger_bytes"] == sum(len((indexed / ledger_key(1, u)).read_bytes()) for u in range(3))
    for key in plain.ledger:
        for name, array in plain.read_unit(*key).items():
            np.testing.assert_array_equal(fast.read_unit(*key)[name], array)


def test_an_index_is_the_same_bytes_whoever_writes_it_and_writing_again_changes_nothing(indexed):
    first = (indexed / epoch_index_key(0)).read_bytes()
    assert write_epoch_index(indexed, 0) == "unchanged"
    (indexed / epoch_index_key(0)).unlink()
    outcomes, failures = [], []

    def write():
        try:
            outcomes.extend(write_epoch_index(indexed, 0) for _ in range(20))
        except Exception as exc:  # two writers must never trip over each other's temporary file
            failures.append(exc)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == [] and "written" in outcomes and set(outcomes) <= {"written", "rewritten", "unchanged"}
    assert (indexed / epoch_index_key(0)).read_bytes() == first
    assert sorted(p.name for p in (indexed / "ledger" / "epochs").iterdir()) == ["e000000.json", "e000001.json"]  # no temporaries


def test_an_epoch_with_a_unit_to_compute_gets_no_index(tmp_path, make_config, helpers):
    path = tmp_path / "partial"
    helpers.run_precompute(make_config(path, max_units=4))  # epoch 0 whole, epoch 1 has one unit
    assert (path / epoch_index_key(0)).is_file()  # written by precompute as the epoch's last unit was committed
    assert index_cache(path, log=quiet) == {"written": [], "rewritten": [], "unchanged": [0], "incomplete": [1]}
    assert not (path / epoch_index_key(1)).exists()
    assert open_cache(path).indexed_epochs() == [0] and len(open_cache(path).ledger) == 4


def test_a_damaged_index_is_refused_naming_it(indexed):
    path = indexed / epoch_index_key(1)
    body = json.loads(path.read_bytes())
    body["entries"][2]["views"] += 1  # an edit that keeps the JSON valid
    path.write_text(json.dumps(body))
    with pytest.raises(ChecksumError, match=r"epoch index ledger/epochs/e000001.json does not match its own sha256"):
        open_cache(indexed)
    line = one_error_line(invoke("info", indexed), 3)
    assert "ledger/epochs/e000001.json" in line and f"kdcache index {indexed}" in line
    path.write_bytes(b"{not json")
    assert "ledger/epochs/e000001.json is not valid JSON" in one_error_line(invoke("info", indexed), 3)
    assert index_cache(indexed, log=quiet)["rewritten"] == [1]  # rebuilt from the entries
    assert open_cache(indexed).indexed_epochs() == [0, 1]


def rewrite_index(path: Path, edit) -> None:
    """Edit an index and give it a valid sha256 again: damage its checksum cannot see."""
    import hashlib

    body = json.loads(path.read_bytes())
    body.pop("sha256")
    edit(body)
    canonical = lambda value: json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    body["sha256"] = hashlib.sha256(canonical(body)).hexdigest()
    path.write_bytes(canonical(body))


@pytest.mark.parametrize("edit, named", [
    (lambda b: b.update(kind="something-else"), "is not an epoch index (kind 'something-else', expected 'kdcache-epoch-index')"),
    (lambda b: b.update(epoch=0), "is malformed (epoch 0, expected 1"),
    (lambda b: b["entries"][1].update(epoch=0), "entries[1] is malformed (epoch 0 unit 1 in the index of epoch 1"),
    (lambda b: b["entries"][1].pop("files"), "entries[1] is malformed (KeyError('files'))"),
    (lambda b: b.update(ledger_bytes="many"), "is malformed (epoch 1, expected 1, with a list of entries and ledger_bytes)"),
], ids=["kind", "epoch", "entry-epoch", "entry-files", "ledger-bytes"])
def test_an_index_with_a_valid_checksum_but_wrong_content_is_refused_naming_it(indexed, edit, named):
    rewrite_index(indexed / epoch_index_key(1), edit)
    line = one_error_line(invoke("info", indexed), 3)
    assert f"epoch index ledger/epochs/e000001.json" in line and named in line


def test_a_file_in_the_index_directory_that_is_no_index_is_named(indexed):
    (indexed / "ledger" / "epochs" / "notes.json").write_text("{}")
    line = one_error_line(invoke("info", indexed), 3)
    assert line == (f"error: {indexed}: ledger/epochs/notes.json is not an epoch index name "
                    "(expected ledger/epochs/eEEEEEE.json)")


def test_an_entry_removed_after_opening_is_refused_when_its_unit_is_read(indexed):
    cache = open_cache(indexed)
    (indexed / ledger_key(1, 2)).unlink()
    with pytest.raises(IncompleteCacheError, match=r"epoch 1 unit 2: its ledger entry ledger/e000001-u000002.json is missing, "
                                                   r"but the epoch index ledger/epochs/e000001.json lists it"):
        cache.read_block(1, 4)


def test_an_entry_that_disagrees_with_its_index_is_refused_when_its_unit_is_read(indexed, tmp_path):
    entry_path = indexed / ledger_key(0, 1)
    entry = json.loads(entry_path.read_bytes())
    entry["committed"] = "2000-01-01T00:00:00+00:00"  # a commit time is no content: a unit committed twice agrees
    entry_path.write_text(json.dumps(entry, indent=1))
    open_cache(indexed).read_block(0, 2)
    entry["views"] += 1
    entry_path.write_text(json.dumps(entry, indent=1))
    cache = open_cache(indexed)  # opening reads the index only
    cache.read_block(0, 0)  # another unit
    with pytest.raises(ChecksumError, match=r"epoch 0 unit 1: its ledger entry ledger/e000000-u000001.json and the epoch index "
                                            r"ledger/epochs/e000000.json disagree \(views\)"):
        cache.read_block(0, 2)
    result = invoke("verify", indexed, "--quick")
    assert result.exit_code == 3 and "disagree (views)" in result.stdout
    result = invoke("merge", tmp_path / "merged", indexed, indexed)
    assert result.exit_code == 3 and "disagree (views)" in result.stderr
    messages = []
    assert index_cache(indexed, log=messages.append)["rewritten"] == [0]
    assert messages == [f"{indexed}: the index of epoch 0 disagreed with its ledger entries; rewritten from them"]
    open_cache(indexed).read_block(0, 2)


def test_a_unit_uncommitted_after_its_index_was_written_is_absent(indexed):
    (indexed / ledger_key(1, 2)).unlink()  # by hand; CacheWriter.uncommit drops the index first
    cache = open_cache(indexed)
    assert cache.indexed_epochs() == [0] and (1, 2) not in cache.ledger and cache.missing_units() == [(1, 2)]
    assert cache.stale_indexes() == ["the epoch index ledger/epochs/e000001.json lists unit 2, whose ledger entry "
                                     "ledger/e000001-u000002.json is missing; the index is ignored"]
    result = invoke("verify", indexed, "--quick")
    assert result.exit_code == 3 and "epoch 1 unit 2 (blocks 4..5) is not committed" in result.stdout
    assert "the index is ignored" in result.stdout
    CacheWriter(indexed).uncommit(0, 1)
    assert not (indexed / epoch_index_key(0)).exists() and not (indexed / ledger_key(0, 1)).exists()


def test_an_index_of_a_later_version_is_passed_over_for_the_entries(indexed, plain):
    path = indexed / epoch_index_key(0)
    body = json.loads(path.read_bytes())
    body["version"] = 2
    path.write_text(json.dumps(body))
    cache = open_cache(indexed)
    assert cache.indexed_epochs() == [1] and cache.ledger == open_cache(plain).ledger


def test_merge_and_export_write_the_indexes_and_keep_the_digest(small_cache, plain, tmp_path):
    digest = open_cache(small_cache).digest()
    export_cache(ExportConfig(cache=str(plain), output=str(tmp_path / "e0"), epochs=(0,)), log=quiet)  # from a cache without
    export_cache(ExportConfig(cache=str(plain), output=str(tmp_path / "e1"), epochs=(1,)), log=quiet)
    assert open_cache(tmp_path / "e0").indexed_epochs() == [0]
    merge_caches(str(tmp_path / "merged"), [str(tmp_path / "e0"), str(tmp_path / "e1")], log=quiet)
    export_cache(ExportConfig(cache=str(plain), output=str(tmp_path / "all.zip"), format="zip"), log=quiet)
    for name in ("merged", "all.zip"):
        cache = open_cache(tmp_path / name)
        assert cache.indexed_epochs() == [0, 1] and cache.digest() == digest, name
    with zipfile.ZipFile(tmp_path / "all.zip") as archive:
        assert archive.read(epoch_index_key(1)) == (tmp_path / "merged" / epoch_index_key(1)).read_bytes()


def test_info_counts_the_files_from_the_ledger_as_they_are_on_disk(indexed):
    info = cache_info(str(indexed))
    assert (info["size_bytes"], info["files"]) == disk_size(indexed)
    assert info["epochs_indexed"] == [0, 1] and len(info["digest"]) == 64


def test_the_index_command_says_what_it_did_and_refuses_what_it_cannot_index(small_cache, plain, tmp_path):
    path = plain
    result = invoke("index", path)
    assert result.exit_code == 0 and result.stdout.strip() == (
        f"{path}: epoch indexes 2 written, 0 rewritten, 0 already up to date; 0 epoch(s) not complete")
    assert invoke("index", path).stdout.strip().endswith("0 written, 0 rewritten, 2 already up to date; 0 epoch(s) not complete")
    line = one_error_line(invoke("index", "http://127.0.0.1:9/cache"), 2)
    assert line.startswith("error: http://127.0.0.1:9/cache: kdcache index writes into a local cache directory")
    assert one_error_line(invoke("index", tmp_path / "nothing"), 3) == f"error: cache {tmp_path / 'nothing'} does not exist"
    export_cache(ExportConfig(cache=str(small_cache), output=str(tmp_path / "wds"), format="wds"), log=quiet)
    assert "is a webdataset export" in one_error_line(invoke("index", tmp_path / "wds"), 2)
    export_cache(ExportConfig(cache=str(small_cache), output=str(tmp_path / "a.zip"), format="zip"), log=quiet)
    assert "not a URL or an archive" in one_error_line(invoke("index", tmp_path / "a.zip"), 2)


# ---- requests over http ------------------------------------------------------------------------------


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    """A static file server that counts the requests it answers."""

    counter = None  # a list, set per server

    def log_message(self, *args):
        pass

    def send_head(self):
        with self.lock:
            self.counter.append(self.path)
        return super().send_head()


@pytest.fixture
def counted_server():
    """``serve(root) -> (url, requests)``: http.server on 127.0.0.1; ``requests`` lists the paths asked for."""
    servers = []

    def serve(root):
        requests: list[str] = []
        handler = type("Handler", (CountingHandler,), {"counter": requests, "lock": threading.Lock()})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", requests

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def hand_cache(path: Path, *, epochs: int, units: int) -> Path:
    """A cache of ``units`` one-block units per epoch (2 samples each) with random records, made without a teacher."""
    sizes = [2] * units
    names = [f"c{c}" for c in range(5)]
    spec = preset("none", output_size=8, mean=(0.5,) * 3, std=(0.5,) * 3)
    from kdcache.augment import param_fields

    manifest = Manifest(
        format_version=FORMAT_VERSION, tool_version="0.0-test", created="2024-01-01T00:00:00+00:00", command="hand-made",
        teacher=TeacherInfo(name="hand", source="timm", checkpoint=None, weights_sha256="0" * 64, num_classes=5,
                            class_names=names, input_size=[3, 8, 8], interpolation="bilinear", mean=[0.5] * 3, std=[0.5] * 3),
        dataset=DatasetInfo(kind="hand", uri="hand:", split="train", num_samples=sum(sizes), num_classes=5,
                            class_names=names, digest="1" * 64),
        augmentation=spec.to_dict(), seed=0, epochs=epochs, k=2,
        dtypes={"values": "float16", "indices": "uint8", "tail": "float16", "params": "float32"},
        tail={"betas": [1.0, 0.25], "temperature_range": [0.5, 10.0]}, param_fields=list(param_fields(spec)),
        replay={"path": "pil"}, blocks=BlockLayout(kind="permutation", block_capacity=2, blocks_per_unit=1, sizes=sizes,
                                                     permutation_seed=0),
        libraries={}, compression=COMPRESSION,
    )
    index = np.arange(sum(sizes), dtype=np.int64)
    samples = {"source_index": index, "label": (index % 5).astype(np.int32), "digest": index.astype(np.uint64),
               "key": np.array([f"s{i}" for i in index]).astype(str)}
    writer = CacheWriter.create(path, manifest, samples, log=quiet)
    rng = np.random.default_rng(0)
    width = len(manifest.param_fields)
    for epoch in range(epochs):
        for unit in range(units):
            writer.write_unit(epoch, unit, {
                "values": np.sort(rng.normal(size=(2, 2)).astype(np.float16), axis=1)[:, ::-1].copy(),
                "indices": np.stack([rng.permutation(5)[:2] for _ in range(2)]).astype(np.uint8),  # distinct classes
                "tail": rng.normal(size=(2, 2)).astype(np.float16),
                "params": rng.normal(size=(2, width)).astype(np.float32),
            })
    return path


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[tuple[int, int], Path]:
    """Caches of (epochs, units per epoch): (2, 4), (2, 40) and (6, 40), each with its epoch indexes."""
    root = tmp_path_factory.mktemp("shapes")
    made = {}
    for epochs, units in ((2, 4), (2, 40), (6, 40)):
        path = hand_cache(root / f"e{epochs}-u{units}", epochs=epochs, units=units)
        index_cache(path, log=quiet)
        made[epochs, units] = path
    return made


def opening_requests(counted_server, path: Path, *, indexes: bool = True) -> tuple[list[str], dict]:
    """The paths ``info`` asks for on a served copy of ``path`` (without its indexes if asked), and the info."""
    root = path.parent / f"www-{path.name}-{indexes}"
    if not root.exists():
        shutil.copytree(path, root / "cache")
        if not indexes:
            shutil.rmtree(root / "cache" / "ledger" / "epochs")
    url, requests = counted_server(root)
    info = cache_info(f"{url}/cache")
    return list(requests), info


def entry_requests(requests: list[str]) -> int:
    return sum(1 for r in requests if re.search(r"/ledger/e\d+-u\d+\.json$", r))


def test_opening_over_http_costs_requests_per_epoch_not_per_unit(shapes, counted_server):
    few, _ = opening_requests(counted_server, shapes[2, 4])
    many, info = opening_requests(counted_server, shapes[2, 40])
    longer, _ = opening_requests(counted_server, shapes[6, 40])
    assert len(few) == len(many) < 30  # ten times the units per epoch, not one request more
    assert len(longer) - len(many) == 4  # one index more per epoch
    assert entry_requests(many) == entry_requests(longer) == 0
    plain, plain_info = opening_requests(counted_server, shapes[2, 40], indexes=False)
    assert entry_requests(plain) == 80  # without indexes: one request per unit
    local = cache_info(str(shapes[2, 40]))
    assert info["digest"] == plain_info["digest"] == local["digest"]
    assert (info["size_bytes"], info["files"]) == (local["size_bytes"], local["files"]) == disk_size(shapes[2, 40])
    assert info["epochs_indexed"] == [0, 1] and plain_info["epochs_indexed"] == []


def test_a_unit_read_over_http_is_checked_against_its_own_entry(shapes, counted_server, tmp_path):
    root = tmp_path / "www"
    shutil.copytree(shapes[2, 4], root / "cache")
    entry = root / "cache" / ledger_key(1, 3)
    entry.write_text(entry.read_text().replace('"views": 2', '"views": 3'))
    url, requests = counted_server(root)
    cache = open_cache(f"{url}/cache")
    assert not any(r.endswith("e000001-u000003.json") for r in requests)
    cache.read_block(1, 2)
    with pytest.raises(FormatError, match=r"epoch 1 unit 3: its ledger entry ledger/e000001-u000003.json and the epoch index "
                                          r"ledger/epochs/e000001.json disagree \(views\)"):
        cache.read_block(1, 3)
