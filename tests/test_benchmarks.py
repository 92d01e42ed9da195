"""The benchmark scripts run in CI at reduced size (--quick), so they cannot rot."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args: str) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                          env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_storage_benchmark_prints_bytes_per_view():
    out = run("storage.py", "--quick")
    assert "blosc-zstd9-shuffle" in out and "TinyViT" in out
    row = next(line for line in out.splitlines() if line.split() and line.split()[0] == "10")
    kdcache_all, tinyvit = float(row.split()[1]), float(row.split()[3])
    assert 0 < kdcache_all and tinyvit == 44.0


@pytest.mark.slow
def test_throughput_benchmark_prints_its_table():
    out = run("throughput.py", "--quick")
    for name in ("bare teacher inference", "precompute-logits", "plain ce", "from the cache", "online kd", "ideal"):
        assert name in out


@pytest.mark.slow
def test_replay_benchmark_prints_its_table():
    out = run("replay.py", "--quick")
    assert "timm" in out and "light" in out and "strong" in out


@pytest.mark.slow
def test_tail_benchmark_prints_its_table():
    out = run("tail.py", "--quick")
    assert "kdcache bucket" in out and "TinyViT dense" in out


@pytest.mark.slow
def test_records_benchmark_prints_the_frontier_and_plots_it(tmp_path):
    out = run("records.py", "--quick", "--plot", str(tmp_path / "records.png"), "--json", str(tmp_path / "records.json"))
    assert "Batch weight-gradient error, student init" in out and "| synthetic (C=100) | full fp16 |" in out
    rows = json.loads((tmp_path / "records.json").read_text())
    full = next(r for r in rows if r["kind"] == "full fp16")
    bucket = next(r for r in rows if r["kind"] == "top-10 bucket")
    assert full["batch kd4/init"] < 1e-3 < bucket["batch kd4/init"] and bucket["bytes"] < full["bytes"]
    assert (tmp_path / "records.png").stat().st_size > 0


@pytest.mark.slow
def test_accuracy_study_runs_every_method_at_reduced_size(tmp_path):
    out = run("accuracy.py", "--quick", "--out", str(tmp_path / "study"))
    table = out.split("\nmethod")[1].split("\n\n")[0].splitlines()[1:]
    rows = {line.split()[0]: line.split()[1:] for line in table}
    assert "online-kd minus light-kd, paired by seed" in out
    for method in ("ce", "fixed-kd", "light-kd", "light-full-kd", "funmatch-kd", "online-kd", "light-ttm", "light-wttm",
                   "light-mkd"):
        mean = float(rows[method][0])
        assert 0 <= mean <= 100
    results = json.loads((tmp_path / "study" / "results.json").read_text())
    assert len(results["online-kd"]["2"]["curves"][0]) == 2  # one evaluation per epoch
    assert (tmp_path / "study" / "accuracy.png").stat().st_size > 10_000
    # A rerun finds every step done and only prints the table again.
    again = run("accuracy.py", "--quick", "--out", str(tmp_path / "study"))
    assert "  runs/" not in again and again.split("teacher test_resnet")[1] == out.split("teacher test_resnet")[1]


@pytest.mark.slow
def test_writers_benchmark_counts_every_unit_once():
    summary = json.loads(run("writers.py", "--quick"))
    assert summary["median_ratio_shared_over_apart"] > 0 and summary["claim_protocol_ms"] > 0
    assert [sum(units) for units in summary["units_per_job_when_shared"]] == [46]  # the benchmark itself refuses a miscount


@pytest.mark.slow
def test_scale_benchmark_prints_its_growth_tables(tmp_path):
    out = run("scale.py", "--quick", "--out", str(tmp_path / "scale"))
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0].replace(",", "").isdigit():
            rows[cells[0]] = cells
    assert {"1,000", "4,000", "20", "100"} <= set(rows)
    assert "training stopped before any step on this block" in out and "sample 's0000" in out
    # opened over http with epoch indexes: one request more per epoch (1 and 5 epochs), not one per unit (20 and 100)
    with_index = int(rows["100"][5]) - int(rows["20"][5])
    without_index = int(rows["100"][11].replace(",", "")) - int(rows["20"][11].replace(",", ""))
    assert with_index == 4 and without_index == 80


@pytest.mark.slow
def test_patience_study_prints_its_tables_and_plots_and_resumes(tmp_path):
    study = tmp_path / "patience"
    out = run("patience.py", "--quick", "--out", str(study))
    table = out.split("\nmethod")[1].split("\n\n")[0].splitlines()[1:]
    rows = {line.split()[0]: [float(v) for v in re.findall(r"\d+\.\d+", line)] for line in table}
    assert set(rows) == {"ce", "fixed-kd", "light-kd", "funmatch-kd", "funmatch-wttm"}
    # mean, std and best epoch at budgets 1 and 3
    assert all(len(row) == 6 and 0 <= row[0] <= 100 and 0 <= row[3] <= 100 for row in rows.values())
    results = json.loads((study / "results.json").read_text())
    # --eval-every 1,1: every epoch is evaluated
    assert [e for e, _ in results["table"]["light-kd"]["3"]["curves"][0]] == [1, 2, 3]
    assert [e for e, _ in results["table"]["light-kd"]["1"]["curves"][0]] == [1]
    cached = {row["cached_epochs"]: row for row in results["cached"]["rows"]}
    assert set(cached) == {1, 3} and 0 < cached[1]["bytes"] < cached[3]["bytes"]
    assert "from 1 cached epochs: cycling through them" in (study / "runs" / "funmatch-kd-e3-c1-s0.log").read_text()
    assert len(results["online"]["diffs"]) == 1
    for plot in ("curves.png", "cached.png"):
        assert (study / plot).stat().st_size > 10_000
    # A rerun finds every step done and only prints the tables again.
    again = run("patience.py", "--quick", "--out", str(study))
    assert "  runs/" not in again and again.split("\nteacher ")[1] == out.split("\nteacher ")[1]


@pytest.mark.slow
def test_teachers_benchmark_prints_throughput_and_bytes_per_teacher():
    out = run("teachers.py", "--quick")
    rows = {line[:58].strip(): line[58:].split() for line in out.splitlines()}
    assert float(rows["add-teacher (read params, decode, replay, teacher, store)"][1]) > 0
    assert float(rows["teacher B (teachers/B/)"][0]) > 0 and float(rows["teacher main (root)"][0]) > 0
    assert float(rows["parameters (root, shared by every teacher)"][0]) > 0


@pytest.mark.slow
def test_gpu_benchmark_prints_every_path_student_and_worker_count():
    out = run("gpu.py", "--quick")
    for name in ("bare teacher inference", "replay path pil", "replay path tensor", "replay path device",
                 "student step on synthetic data", "plain ce", "from the cache", "online kd", "ideal", "workers -> views/s"):
        assert name in out, out
    rates = [float(line.split()[-2]) for line in out.splitlines() if "replay path" in line and "target" not in line]
    assert len(rates) == 2 and all(rate > 0 for rate in rates)
