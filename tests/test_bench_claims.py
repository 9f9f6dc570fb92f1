"""`make bench-claims`: the BENCHMARKS.md section it writes (quick mode) and how it replaces it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

from claims import report  # noqa: E402

OTHER = "# Benchmarks\n\nintro\n\n## Earlier section\n\nkept as it is\n"


def test_section_is_appended_then_replaced_in_place(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(OTHER)
    report.replace_section(path, f"{report.TITLE}\n\nfirst run\n")
    assert path.read_text() == f"{OTHER}\n{report.TITLE}\n\nfirst run\n"
    path.write_text(path.read_text() + "\n## Later section\n\nalso kept\n")
    report.replace_section(path, f"{report.TITLE}\n\nsecond run\n")
    assert path.read_text() == f"{OTHER}\n{report.TITLE}\n\nsecond run\n\n## Later section\n\nalso kept\n"


def test_class_table_shows_missing_values_as_na():
    table = report.class_table({"a": {"liver": 0.5, "spleen": 0.25}, "b": {"liver": float("nan")}})
    assert table.splitlines()[2:] == ["| liver | 0.50 | n/a |", "| spleen | 0.25 | n/a |"]


@pytest.mark.slow
def test_quick_run_writes_all_six_rows(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(OTHER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "claims"), "--quick", "--output", str(path)],
                          capture_output=True, text=True, env=env, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = path.read_text()
    assert text.startswith(OTHER) and text.count(report.TITLE) == 1
    section = text[text.index(report.TITLE):]
    rows = re.findall(r"^\| (\d) \| ([^|]+) \| [^|]+ \| ([^|]+) \|$", section, flags=re.M)
    assert [int(number) for number, _, _ in rows] == [1, 2, 3, 4, 5, 6]
    measured = {claim.strip(): value for _, claim, value in rows}
    assert re.search(r"inference time \d+\.\d\dx", measured["Universal vs dataset-specific"])
    assert re.search(r"universal backbone \d\.\d\d vs random init \d\.\d\d", measured["Transfer (4 labelled cases)"])
    timed = re.findall(r"(\w+) (\d+): \d+\.\d\d", measured["Dynamic head / backbone time"])
    assert timed == [(backbone, classes) for backbone in ("unet", "swinunetr") for classes in ("32", "128", "512")]
    assert re.search(r"streaming [\d.]+ s, peak RSS [\d.]+ GB .*; MONAI [\d.]+ s, peak RSS [\d.]+ GB",
                     measured["Sliding window vs MONAI"])
    assert re.search(r"loader share \d+\.\d%", measured["Training step / bare backbone"])
