"""benchmarks/record_students.py at CI size: every record's cache, every student, the paired table, a resume.

Its own file, so that ``--dist loadfile`` runs it beside test_benchmarks.py rather than after it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdcache.record import DEFAULT_TAIL

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "record_students.py"), *args], capture_output=True,
                          text=True, env=env, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_record_students_trains_every_record_and_pairs_them_by_seed(tmp_path):
    out = run("--quick", "--no-ce", "--out", str(tmp_path))
    results = json.loads((tmp_path / "students" / "results.json").read_text())
    sizes = results["bytes_per_view"]
    assert set(sizes) == {"full", "top10-bucket", "top22-bucket", "top10-code"}
    # every logit of 1000 classes costs far more than any top-k record; the code costs more than the bucket it extends
    assert sizes["full"] > 5 * sizes["top22-bucket"] and sizes["top10-code"] > sizes["top10-bucket"]
    for loss in ("kd-t4", "wttm-g0.25"):
        rows = results["losses"][loss]
        assert rows["full"]["minus_full"] == [0.0]
        for record, row in rows.items():
            assert len(row["top1"]) == 1 and 0.0 <= row["top1"][0] <= 100.0
            assert row["minus_full"][0] == pytest.approx(row["top1"][0] - rows["full"]["top1"][0])
            assert f"| {loss} | {record} |" in out
    # the caches hold what their options asked for
    manifests = {name: json.loads((tmp_path / "students" / f"cache-{name}" / "zarr.json").read_text())["attributes"]
                 for name in sizes}
    coded = manifests["top10-code"]["kdcache"]["tail"]
    assert coded["rank"] == DEFAULT_TAIL.rank and coded["code_beta"] == DEFAULT_TAIL.code_beta and "code_check" in coded
    assert "rank" not in manifests["top10-bucket"]["kdcache"]["tail"]
    # a second run finds every step done and prints the same table
    assert run("--quick", "--no-ce", "--out", str(tmp_path)).splitlines()[-12:] == out.splitlines()[-12:]


def test_record_students_refuses_an_unknown_loss(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "record_students.py"), "--losses", "kd-t9",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode != 0 and "--losses takes some of kd-t4, wttm-g0.25" in done.stderr
