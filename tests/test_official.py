"""benchmarks/official.py at its quick size: a full record gives the official implementations' losses, and the
default record's tail code brings KD at T = 4 closer to them than the top-10 bucket does."""

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import pytest
from threads import single_thread

ROOT = Path(__file__).resolve().parents[1]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("official_benchmark", ROOT / "benchmarks" / "official.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """(the rows of the quick run, read back from its --json, and the table it printed)."""
    official = _load_benchmark()
    path = tmp_path_factory.mktemp("official") / "official.json"
    printed = io.StringIO()
    with single_thread(), contextlib.redirect_stdout(printed):
        official.main(["--quick", "--json", str(path)])
    return json.loads(path.read_text()), printed.getvalue()


def test_the_quick_run_covers_every_setting_official_and_student(quick):
    result, printed = quick
    seen = {(r["loss"], r["value"], r["official"], r["student"]) for r in result["rows"]}
    settings = [("kd", 1.0), ("kd", 4.0), ("ttm", 0.1), ("ttm", 0.25), ("wttm", 0.8), ("wttm", 0.25)]
    expected = {(name, value, official, student) for name, value in settings
                for official in {"kd": ("timm", "RepDistiller"), "ttm": ("zkxufo/TTM",), "wttm": ("zkxufo/TTM",)}[name]
                for student in ("random", "fitted")}
    assert seen == expected
    assert "| structured r32 | KD T=4 | fitted |" in printed


def test_a_full_record_gives_the_official_loss_and_gradient_in_every_setting(quick):
    result, _ = quick
    for row in result["rows"]:
        label = f"{row['setting']} vs {row['official']}, {row['student']} student"
        assert row["full"]["loss"] < 1e-5, label
        assert row["full"]["grad"] < 1e-5, label


def test_the_comparison_sees_what_a_top_10_bucket_leaves_out(quick):
    # the same comparison that finds a full record exact must find the bucket's error at KD T = 4 (most of the
    # tempered mass lies outside the top 10), or it compares nothing
    result, _ = quick
    for row in result["rows"]:
        if row["setting"] == "KD T=4":
            assert row["top-10 bucket"]["grad"] > 0.1, row["student"]


def test_the_default_records_tail_code_beats_the_bucket_for_kd_at_t4_on_a_structured_teacher(quick):
    result, _ = quick
    rows = [r for r in result["rows"] if r["setting"] == "KD T=4" and r["group"].startswith("structured")]
    assert len(rows) == 4  # two officials x two students
    for row in rows:
        assert row["default record"]["grad"] < row["top-10 bucket"]["grad"], (row["official"], row["student"])
