"""Scale: what grows with the dataset's size N, and what grows with a cache's units.

    python benchmarks/scale.py                          # N = 10k, 100k, 1.28M; caches of 100, 1,000, 6,000 units
    python benchmarks/scale.py --quick                  # CI size: N = 1k, 4k; caches of 20, 100 units
    python benchmarks/scale.py --sizes 10000 --units 100 --out /tmp/scale   # any part of it

**Against N.** A synthetic webdataset source of N tiny images (8-16 px, random pixels, 1,000
classes, shards of 1,024 samples: one block each, as ImageNet-1k would be laid out) and a tiny
teacher (timm ``test_resnet`` with random weights at 16 px). Measured: planning (one read of every
sample), precompute of one epoch (planning included), the manifest's and the plan's bytes, and
train-student's time to its first step (model build excluded; no pass over the data). At the
largest N one image is then replaced: training must stop at the block that holds it, naming it.

**Against units.** Caches of U units (blocks of 64 samples, one block per unit, 20 units per epoch,
U / 20 epochs) opened from a local disk and from Python's http.server on 127.0.0.1, run as a
separate process that counts the requests it answers, with and without epoch indexes: ``info``
(in this process, and as a ``kdcache info`` command) and train-student's time to its first step.

Sources, caches and measured steps are kept under ``--out``: a rerun measures only what is missing
(``--fresh`` measures everything again). The tables are printed as markdown.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")  # as precompute-logits sets it

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 1000
SHARD = 1024  # samples per shard = per block (ImageNet-1k: 1,252 blocks of 1,024)
UNIT_BLOCK = 64  # part 2: samples per block; one block per unit
UNITS_PER_EPOCH = 20  # part 2, as ImageNet-1k at --blocks-per-unit 64
SIZE = 16  # teacher input (and view) size in pixels


# ---- the counting file server (a separate process) --------------------------------------------------------


class _Counting(http.server.SimpleHTTPRequestHandler):
    count = 0
    lock = threading.Lock()

    def log_message(self, *args):
        pass

    def send_head(self):
        if self.path in ("/_count", "/_reset"):
            with self.lock:
                value = type(self).count
                if self.path == "/_reset":
                    type(self).count = 0
            body = json.dumps({"requests": value}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            return io.BytesIO(body)
        with self.lock:
            type(self).count += 1
        return super().send_head()


def serve(root: str, port_file: str) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Counting, directory=root))
    Path(port_file).write_text(str(server.server_address[1]))
    server.serve_forever()


class Server:
    """http.server on 127.0.0.1 in its own process, serving ``root``, counting requests."""

    def __init__(self, root: Path, tmp: Path):
        port_file = tmp / f"port-{os.getpid()}-{time.monotonic_ns()}"
        self.process = subprocess.Popen([sys.executable, __file__, "--serve", str(root), "--port-file", str(port_file)])
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError("the file server did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{int(port_file.read_text())}"

    def requests(self, reset: bool = True) -> int:
        with urllib.request.urlopen(f"{self.url}/{'_reset' if reset else '_count'}") as answer:
            return json.loads(answer.read())["requests"]

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


# ---- data, teacher ---------------------------------------------------------------------------------------


def make_source(folder: Path, n: int, *, shard: int, seed: int = 0) -> str:
    """N random images of 8-16 px in tar shards of ``shard`` samples, with classes.txt; returns the brace pattern."""
    import numpy as np
    from PIL import Image

    shards = -(-n // shard)
    pattern = str(folder / f"data-{{000000..{shards - 1:06d}}}.tar")
    done = folder / "done.json"
    if done.exists() and json.loads(done.read_text()) == {"n": n, "shard": shard, "seed": seed}:
        return pattern
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "classes.txt").write_text("".join(f"class{c:04d}\n" for c in range(CLASSES)))
    rng = np.random.default_rng(seed)
    for s in range(shards):
        with tarfile.open(folder / f"data-{s:06d}.tar", "w") as tar:
            for i in range(s * shard, min(n, (s + 1) * shard)):
                h, w = rng.integers(8, 17, size=2)
                png = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(png, format="png")
                for ext, data in (("png", png.getvalue()), ("cls", str(int(rng.integers(CLASSES))).encode())):
                    info = tarfile.TarInfo(f"s{i:08d}.{ext}")
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
    done.write_text(json.dumps({"n": n, "shard": shard, "seed": seed}))
    return pattern


def make_teacher(path: Path):
    import timm
    import torch

    from kdcache.teacher import MODEL_META_KEY, TeacherConfig

    if not path.exists():
        torch.manual_seed(0)
        net = timm.create_model("test_resnet", pretrained=False, num_classes=CLASSES)
        meta = {"input_size": (3, SIZE, SIZE), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear"}
        torch.save({"state_dict": net.state_dict(), MODEL_META_KEY: meta}, path)
    return TeacherConfig(model="test_resnet", checkpoint=str(path))


def quiet(message: str) -> None:
    pass


# ---- measurements ----------------------------------------------------------------------------------------


class _FirstStep(Exception):
    pass


def time_to_first_step(cache: str, data: str, run_dir: Path, *, batch_size: int = 256, server: Server | None = None) -> dict:
    """Seconds from calling train_student to the end of its first step, less the model build; and the requests it made."""
    import kdcache.student
    import kdcache.train
    from kdcache.losses import LossConfig
    from kdcache.student import StudentConfig, train_student

    shutil.rmtree(run_dir, ignore_errors=True)
    timings = {}
    build, train = kdcache.train._build, kdcache.student.train

    def timed_build(*args, **kwargs):
        start = time.perf_counter()
        try:
            return build(*args, **kwargs)
        finally:
            timings["build"] = time.perf_counter() - start

    def first_step(step):
        timings["first_step"] = time.perf_counter()
        raise _FirstStep

    kdcache.train._build = timed_build
    kdcache.student.train = functools.partial(train, on_step=first_step)
    if server is not None:
        server.requests(reset=True)
    config = StudentConfig(data=data, model="test_resnet", run_dir=str(run_dir), cache=cache, loss=LossConfig(name="kd"),
                           epochs=1, batch_size=batch_size, device="cpu", amp="none", log_every=1)
    start = time.perf_counter()
    try:
        train_student(config, log=quiet)
        raise RuntimeError("training ended before its first step")
    except _FirstStep:
        pass
    finally:
        kdcache.train._build, kdcache.student.train = build, train
    out = {"seconds": timings["first_step"] - start - timings["build"], "model_build_s": timings["build"]}
    if server is not None:
        out["requests"] = server.requests(reset=True)
    return out


def directory_bytes(path: Path, prefix: str = "") -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and str(p.relative_to(path)).startswith(prefix))


def replaced_image_run(cache: Path, pattern: str, tmp: Path) -> dict:
    """Replace one image (the first of the second window's first block), train, and report where it stopped."""
    import numpy as np
    from PIL import Image

    from kdcache.errors import MismatchError
    from kdcache.format import open_cache
    from kdcache.loader import LoaderConfig, _EpochPlan
    from kdcache.losses import LossConfig
    from kdcache.sources import open_source
    from kdcache.student import StudentConfig, train_student

    opened = open_cache(cache)
    layout = opened.layout
    views = type("Views", (), {"layout": layout})()
    plan = _EpochPlan(views, list(range(layout.num_blocks)), LoaderConfig(batch_size=256), 0, 0)
    first_window = {}  # block -> the first window with a view of it
    for w, members in enumerate(plan.windows):
        for b in members[:, 0].tolist():
            first_window.setdefault(int(b), w)
    later = [b for b, w in first_window.items() if w > 0]  # a block read after some steps, if there is one
    block = min(later, key=lambda b: first_window[b]) if later else int(plan.windows[0][0, 0])
    before = sum(len(plan.windows[w]) // 256 for w in range(first_window[block]))
    source = open_source(pattern, shard_sizes=layout.sizes)
    shard = Path(source.urls[block])
    backup = tmp / f"{shard.name}.orig"
    shutil.copy2(shard, backup)
    key = str(opened.samples()["key"][layout.block_slots(block)][0])
    try:
        with tarfile.open(backup) as original, tarfile.open(shard, "w") as tar:
            for member in original:
                data = original.extractfile(member).read()
                if member.name == f"{key}.png":
                    png = io.BytesIO()
                    Image.fromarray(np.full((12, 12, 3), 7, dtype=np.uint8)).save(png, format="png")
                    data = png.getvalue()
                info = tarfile.TarInfo(member.name)
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
        run_dir = tmp / "replaced-run"
        shutil.rmtree(run_dir, ignore_errors=True)
        config = StudentConfig(data=pattern, model="test_resnet", run_dir=str(run_dir), cache=str(cache),
                               loss=LossConfig(name="kd"), epochs=1, batch_size=256, device="cpu", amp="none", log_every=1)
        start = time.perf_counter()
        try:
            train_student(config, log=quiet)
            message = "training did not stop"
        except MismatchError as exc:
            message = str(exc)
        seconds = time.perf_counter() - start
        from kdcache.runlog import read_metrics

        steps = max((m["step"] for m in read_metrics(run_dir / "metrics.jsonl") if m["kind"] == "train"), default=0)
    finally:
        shutil.copy2(backup, shard)
        backup.unlink()
    return {"block": block, "key": key, "steps_before": before, "steps_done": steps, "seconds": seconds, "error": message}


def part_n(n: int, out: Path, teacher, results: dict, fresh: bool, replace: bool) -> dict:
    from kdcache.format import open_cache
    from kdcache.plan import plan_layout, scan_plan
    from kdcache.precompute import PrecomputeConfig, precompute_logits
    from kdcache.sources import open_source

    row = results.setdefault(f"n{n}", {})
    folder = out / f"n{n}"
    if "source_s" not in row or fresh:
        start = time.perf_counter()
        pattern = make_source(folder / "data", n, shard=SHARD)
        row["source_s"], row["pattern"] = time.perf_counter() - start, pattern
    pattern = make_source(folder / "data", n, shard=SHARD)
    cache = folder / "cache"
    if "planning_s" not in row or fresh:
        start = time.perf_counter()
        source = open_source(pattern)
        layout, members = plan_layout(source, block_size=SHARD, blocks_per_unit=64, seed=0)
        scan_plan(source, layout, members)
        row["planning_s"] = time.perf_counter() - start
    if "precompute_s" not in row or fresh or not (cache / "zarr.json").exists():
        shutil.rmtree(cache, ignore_errors=True)
        start = time.perf_counter()
        done = precompute_logits(PrecomputeConfig(data=pattern, output=str(cache), teacher=teacher, epochs=1, topk=10,
                                           augmentation="light", block_size=SHARD, blocks_per_unit=64, batch_size=256,
                                           command="benchmarks/scale.py"), log=quiet)
        row["precompute_s"] = time.perf_counter() - start
        row["views"] = done.views
        row["units"] = open_cache(cache).layout.num_units
    row["manifest_bytes"] = (cache / "zarr.json").stat().st_size
    row["plan_bytes"] = directory_bytes(cache, "samples")
    row["cache_bytes"] = directory_bytes(cache)
    if replace and ("replaced" not in row or fresh):
        row["replaced"] = replaced_image_run(cache, pattern, folder)
    return row


def first_steps(sizes: list[int], out: Path, results: dict, rounds: int) -> None:
    """Time to the first step at each N, in alternating rounds (the best of ``rounds``): a shared machine's load
    then weighs on every N alike. The work before the first step is the first window (4 blocks) whatever N is."""
    best: dict[int, dict] = {}
    for _ in range(rounds):
        for n in sizes:
            row = results[f"n{n}"]
            measured = time_to_first_step(str(out / f"n{n}" / "cache"), row["pattern"], out / f"n{n}" / "run")
            if n not in best or measured["seconds"] < best[n]["seconds"]:
                best[n] = measured
    for n, measured in best.items():
        results[f"n{n}"]["first_step_s"], results[f"n{n}"]["model_build_s"] = measured["seconds"], measured["model_build_s"]


def part_units(units: list[int], out: Path, teacher, results: dict, fresh: bool, rounds: int) -> None:
    """Caches of each size in ``units`` (20 units per epoch), grown from one another with --resume --epochs."""
    from kdcache.format import open_cache
    from kdcache.format.ledger import INDEX_DIR, index_cache
    from kdcache.info import cache_info
    from kdcache.precompute import PrecomputeConfig, precompute_logits

    pattern = make_source(out / "units-data", UNITS_PER_EPOCH * UNIT_BLOCK, shard=UNIT_BLOCK)
    previous = None
    for count in sorted(units):
        epochs = max(1, count // UNITS_PER_EPOCH)
        row = results.setdefault(f"u{count}", {})
        cache = out / f"units-{count}" / "cache"
        if "precompute_s" not in row or fresh or not (cache / "zarr.json").exists():
            shutil.rmtree(cache.parent, ignore_errors=True)
            cache.parent.mkdir(parents=True)
            if previous is not None:
                shutil.copytree(previous, cache)
            start = time.perf_counter()
            precompute_logits(PrecomputeConfig(data=pattern, output=str(cache), teacher=teacher, epochs=epochs, topk=10,
                                        augmentation="light", blocks_per_unit=1, batch_size=256, resume=previous is not None,
                                        command="benchmarks/scale.py"), log=quiet)
            row["precompute_s"] = time.perf_counter() - start
        index_cache(cache, log=quiet)  # precompute writes them as epochs complete; this adds any missing
        previous = cache
        opened = open_cache(cache)
        row["units"], row["epochs"], row["files"] = len(opened.ledger), epochs, sum(1 for p in cache.rglob("*") if p.is_file())
        hidden = cache.parent / "hidden-index"
        fresh_round = True  # the first round replaces what an earlier run measured
        server = Server(cache.parent, out)
        try:
            url = f"{server.url}/cache"
            for name, where in (("local", str(cache)), ("http", url)):
                start = time.perf_counter()
                info = cache_info(where)
                row[f"info_{name}_s"] = time.perf_counter() - start
                if name == "http":
                    row["info_http_requests"] = server.requests(reset=True)
            row["digest"] = info["digest"]
            server.requests(reset=True)
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "kdcache_cli.main", "info", url], check=True, capture_output=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
            row["info_command_http_s"] = time.perf_counter() - start
            server.requests(reset=True)
            for _ in range(rounds):  # alternating, the best of each
                for name, where in (("first_step_local", str(cache)), ("first_step_http", url)):
                    measured = time_to_first_step(where, pattern, cache.parent / "run", batch_size=64,
                                                  server=server if where == url else None)
                    if name not in row or measured["seconds"] < row[name]["seconds"] or fresh_round:
                        row[name] = measured
                fresh_round = False
            shutil.move(cache / INDEX_DIR, hidden)  # the same cache as one without indexes (an older kdcache's)
            try:
                start = time.perf_counter()
                assert cache_info(url)["digest"] == row["digest"]
                row["plain_info_http_s"] = time.perf_counter() - start
                row["plain_info_http_requests"] = server.requests(reset=True)
                row["plain_first_step_http"] = time_to_first_step(url, pattern, cache.parent / "run", batch_size=64,
                                                                  server=server)
            finally:
                shutil.move(hidden, cache / INDEX_DIR)
        finally:
            server.close()


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def report(results: dict, sizes: list[int], units: list[int]) -> str:
    import torch

    lines = [f"CPU: {cpu_model()}, {os.cpu_count()} cores; torch threads {torch.get_num_threads()}", ""]
    lines += ["Against N (webdataset shards of 1,024 tiny images = one block each, 64 blocks per unit, 1 epoch, k = 10):", "",
              "| N | blocks | units | make the source | planning | precompute (1 epoch) | views/s | manifest | plan | cache "
              "| first step | model build |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in sizes:
        r = results.get(f"n{n}")
        if not r:
            continue
        lines.append(f"| {n:,} | {-(-n // SHARD):,} | {r['units']} | {r['source_s']:.1f} s | {r['planning_s']:.1f} s "
                     f"| {r['precompute_s']:.1f} s | {r['views'] / r['precompute_s']:,.0f} | {r['manifest_bytes'] / 1e3:,.1f} kB "
                     f"| {r['plan_bytes'] / 1e6:,.2f} MB | {r['cache_bytes'] / 1e6:,.1f} MB | {r['first_step_s']:.2f} s "
                     f"| {r['model_build_s']:.2f} s |")
    replaced = [(n, results[f"n{n}"]["replaced"]) for n in sizes if "replaced" in results.get(f"n{n}", {})]
    for n, r in replaced:
        lines += ["", f"One image replaced at N = {n:,} (block {r['block']}, sample {r['key']}): training stopped after "
                      f"{r['steps_done']} step(s) (the blocks before it give {r['steps_before']}), {r['seconds']:.1f} s after "
                      "it started, with:", "", f"    error: {r['error']}"]
    lines += ["", "Against units (blocks of 64 samples, one block per unit, 20 units per epoch; http.server on 127.0.0.1 "
                  "in another process):", "",
              "| units | epochs | files | info, local | info, http | requests | `kdcache info` URL | first step, local "
              "| first step, http | requests | no index: info, http | requests | first step, http | requests |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for count in units:
        r = results.get(f"u{count}")
        if not r or "plain_first_step_http" not in r:
            continue
        lines.append(f"| {r['units']:,} | {r['epochs']} | {r['files']:,} | {r['info_local_s']:.2f} s | {r['info_http_s']:.2f} s "
                     f"| {r['info_http_requests']} | {r['info_command_http_s']:.2f} s | {r['first_step_local']['seconds']:.2f} s "
                     f"| {r['first_step_http']['seconds']:.2f} s | {r['first_step_http']['requests']} "
                     f"| {r['plain_info_http_s']:.2f} s | {r['plain_info_http_requests']:,} "
                     f"| {r['plain_first_step_http']['seconds']:.2f} s | {r['plain_first_step_http']['requests']:,} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI size: N = 1k, 4k; caches of 20 and 100 units")
    parser.add_argument("--sizes", help="comma-separated N (default 10000,100000,1280000)")
    parser.add_argument("--units", help="comma-separated unit counts (default 100,1000,6000)")
    parser.add_argument("--out", default=None, help="where sources, caches and results.json are kept")
    parser.add_argument("--fresh", action="store_true", help="measure every step again")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds of the first-step timings, the best kept "
                                                                  "(default 3, with --quick 1)")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port_file)
        return
    sizes = [int(x) for x in (args.sizes or ("1000,4000" if args.quick else "10000,100000,1280000")).split(",") if x]
    units = [int(x) for x in (args.units or ("20,100" if args.quick else "100,1000,6000")).split(",") if x]
    out = Path(args.out or (Path(os.environ.get("TMPDIR", "/tmp")) / ("kdcache-scale-quick" if args.quick else "kdcache-scale")))
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() and not args.fresh else {}
    teacher = make_teacher(out / "teacher.pt")
    args.rounds = args.rounds or (1 if args.quick else 3)
    for n in sorted(sizes):
        part_n(n, out, teacher, results, args.fresh, replace=n == max(sizes))
        results_path.write_text(json.dumps(results, indent=1))
        print(f"N = {n}: done", file=sys.stderr, flush=True)
    first_steps(sorted(sizes), out, results, args.rounds)
    results_path.write_text(json.dumps(results, indent=1))
    part_units(units, out, teacher, results, args.fresh, args.rounds)
    results_path.write_text(json.dumps(results, indent=1))
    print(report(results, sorted(sizes), sorted(units)))


if __name__ == "__main__":
    main()
