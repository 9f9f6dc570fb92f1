"""``clipseg3d segment`` reruns and bad inputs: a killed run resumes, a folder is "done" only for the same
input, checkpoint and settings, and every bad input is one line with nothing written."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from clipseg3d.cli.segment import main, output_names
from clipseg3d.models.importer import sha256_of

from conftest import REPO

LEGACY = REPO / "tests" / "data" / "legacy"
CKPT = LEGACY / "base.ckpt"
SCAN = LEGACY / "scan.nii.gz"
FAST = ["--roi", "16", "16", "16", "--no-overlay"]


def run_segment(args: list) -> tuple[int, str]:
    """``clipseg3d segment ARGS`` in-process; returns the exit code and the stderr lines joined."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([str(arg) for arg in args])
    lines = [line.strip() for line in err.getvalue().replace("\r", "\n").splitlines()]
    progress = ("segment:", "windows:", "Loading weights")  # progress bars
    return code, "\n".join(line for line in lines if line and not line.startswith(progress))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("clipseg3d segment: error: ")]


def stats(folder: Path) -> dict[str, tuple[int, int]]:
    """Each file's (inode, mtime) under ``folder``."""
    return {str(path.relative_to(folder)): (path.stat().st_ino, path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture
def scans(tmp_path) -> list[Path]:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("scan1", "scan2", "scan3"):
        shutil.copy(SCAN, folder / f"{name}.nii.gz")
    return sorted(folder.iterdir())


def other_checkpoint(tmp_path: Path) -> Path:
    """The tiny checkpoint with one weight changed: other bytes, so another sha256."""
    checkpoint = torch.load(CKPT, weights_only=True)
    key = next(key for key in checkpoint["state_dict"] if key.endswith("weight"))
    checkpoint["state_dict"][key] = checkpoint["state_dict"][key] * 1.01
    path = tmp_path / "other.ckpt"
    torch.save(checkpoint, path)
    return path


# -- reruns ---------------------------------------------------------------------------------------
def test_a_killed_run_resumes_where_it_stopped_and_another_checkpoint_is_not_done(scans, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "clipseg3d", "segment", *map(str, scans), "--ckpt", str(CKPT), "-o", str(out),
               *FAST]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not ((out / "scan1").is_dir() and (out / ".scan2.partial").is_dir()):
        assert process.poll() is None and time.monotonic() < deadline, "segment ended before scan 2"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (out / ".scan2.partial").is_dir()  # what the killed run left
    assert not (out / "scan2").exists() and not (out / "scan3").exists()
    before = stats(out / "scan1")
    assert "labels.nii.gz" in before and "report.json" in before
    (out / ".scan1.old").mkdir()  # what a run killed while replacing scan1's folder leaves

    code, stderr = run_segment([*scans, "--ckpt", CKPT, "-o", out, *FAST])
    assert code == 0, stderr
    assert "skip: scan1: already done with this checkpoint and settings (--overwrite to redo)" in stderr
    assert "2 segmented, 1 already done" in stderr
    assert sorted(path.name for path in out.iterdir()) == ["scan1", "scan2", "scan3"]  # no .partial left
    assert stats(out / "scan1") == before
    for name in ("scan2", "scan3"):
        report = json.loads((out / name / "report.json").read_text())
        assert report["input"] == str(scans[int(name[-1]) - 1]) and report["checkpoint_sha256"] == sha256_of(CKPT)

    other = other_checkpoint(tmp_path)
    code, stderr = run_segment([scans[0], "--ckpt", other, "-o", out, *FAST])
    assert code == 0, stderr
    assert (f"redo: scan1: its folder was made with another checkpoint (sha256 {sha256_of(CKPT)[:12]}...); "
            "segmenting it again") in stderr
    assert json.loads((out / "scan1" / "report.json").read_text())["checkpoint_sha256"] == sha256_of(other)
    assert stats(out / "scan1")["labels.nii.gz"] != before["labels.nii.gz"]


def test_other_settings_classes_or_input_are_redone_and_say_why(tmp_path):
    out = tmp_path / "out"
    first, second = tmp_path / "a" / "ct.nii.gz", tmp_path / "b" / "ct.nii.gz"
    for path in (first, second):
        path.parent.mkdir()
        shutil.copy(SCAN, path)
    assert run_segment([first, "--ckpt", CKPT, "-o", out, *FAST])[0] == 0
    code, stderr = run_segment([first, "--ckpt", CKPT, "-o", out, *FAST, "--threshold", "0.4"])
    assert code == 0 and "redo: ct: its folder was made with --threshold 0.5, now 0.4; segmenting it again" in stderr
    code, stderr = run_segment([first, "--ckpt", CKPT, "-o", out, *FAST, "--threshold", "0.4", "--probabilities"])
    assert code == 0 and "redo: ct: its folder lacks what is asked for now (probabilities)" in stderr
    code, stderr = run_segment([first, "--ckpt", CKPT, "-o", out, *FAST, "--threshold", "0.4"])
    assert code == 0 and "skip: ct: already done" in stderr  # a folder with more outputs than asked will do
    code, stderr = run_segment([first, "--ckpt", CKPT, "-o", out, *FAST, "--threshold", "0.4", "--classes", "liver"])
    assert code == 0 and ("redo: ct: its folder was made for other classes (liver, liver_tumor, right_kidney, "
                          "left_kidney)") in stderr
    assert json.loads((out / "ct" / "classes.json").read_text()) == {"1": "liver"}
    code, stderr = run_segment([second, "--ckpt", CKPT, "-o", out, *FAST, "--threshold", "0.4", "--classes", "liver"])
    assert code == 0 and f"redo: ct: its folder holds the result of another input ({first})" in stderr
    assert json.loads((out / "ct" / "report.json").read_text())["input"] == str(second)


def test_a_folder_that_is_no_segment_output_is_left_alone(tmp_path):
    out = tmp_path / "out"
    (out / "scan").mkdir(parents=True)
    (out / "scan" / "notes.txt").write_text("mine")
    code, stderr = run_segment([SCAN, "--ckpt", CKPT, "-o", out, *FAST])
    assert code == 1
    assert error_lines(stderr) == [
        f"clipseg3d segment: error: scan: {out / 'scan'} exists but holds no clipseg3d report.json; move it away "
        "or use --overwrite to replace it",
        f"clipseg3d segment: error: 1 of 1 scans failed (listed above); 0 segmented, 0 already done; outputs in {out}"]
    assert [path.name for path in (out / "scan").iterdir()] == ["notes.txt"]


def test_plain_word_classes_are_matched_with_a_note(tmp_path):
    out = tmp_path / "out"
    code, stderr = run_segment([SCAN, "--ckpt", CKPT, "-o", out, *FAST, "--classes", "liver cancer", "Liver"])
    assert code == 0, stderr
    assert "note: 'liver cancer' -> liver_tumor (similarity" in stderr
    assert json.loads((out / "scan" / "classes.json").read_text()) == {"1": "liver", "2": "liver_tumor"}


# -- output names ---------------------------------------------------------------------------------
def test_an_empty_scan_name_takes_its_folder_name_never_the_output_root():
    assert output_names([Path("/d/case7/.nii.gz"), Path("/d/..nii.gz"), Path("/.nii.gz"), Path("/d/.hidden.nii")]) \
        == ["case7", "d", "scan", "hidden"]
    assert output_names([Path("/d/case7/.nii.gz"), Path("/d/case7.nii.gz")]) == ["case7", "case7_2"]
    assert output_names([Path("/x/case7/.nii.gz"), Path("/y/case7.nii.gz")]) == ["x_case7", "y_case7"]


def test_a_scan_without_a_name_gets_its_own_folder_and_overwrite_keeps_the_others(tmp_path):
    out = tmp_path / "out"
    (out / "earlier").mkdir(parents=True)
    (out / "earlier" / "labels.nii.gz").write_bytes(b"an earlier result")
    nameless = tmp_path / "case7" / ".nii.gz"
    dotted = tmp_path / "case7" / "..nii.gz"
    nameless.parent.mkdir()
    shutil.copy(SCAN, nameless)
    shutil.copy(SCAN, dotted)
    for extra in ([], ["--overwrite"], []):
        code, stderr = run_segment([nameless, dotted, "--ckpt", CKPT, "-o", out, *FAST, *extra])
        assert code == 0, stderr
        assert sorted(path.name for path in out.iterdir()) == ["case7", "case7_2", "earlier"]
    assert (out / "earlier" / "labels.nii.gz").read_bytes() == b"an earlier result"
    assert json.loads((out / "case7" / "report.json").read_text())["input"] == str(nameless)
    assert json.loads((out / "case7_2" / "report.json").read_text())["input"] == str(dotted)


# -- bad inputs: one line each, nothing written ---------------------------------------------------
@pytest.mark.parametrize("damage, detail", [
    (lambda meta: meta["backbone"].update(name="resnet9000"), "unknown backbone 'resnet9000'; registered: "),
    (lambda meta: meta.pop("embedding_dim"), "its metadata lacks the key 'embedding_dim'"),
    (lambda meta: meta["head"].pop("hidden"), "its metadata lacks the key 'hidden'"),
], ids=["unknown backbone", "no embedding_dim", "no head hidden"])
def test_checkpoint_metadata_that_builds_no_model_is_one_line(damage, detail, tmp_path):
    checkpoint = torch.load(CKPT, weights_only=True)
    damage(checkpoint["clipseg3d"])
    path = tmp_path / "bad.ckpt"
    torch.save(checkpoint, path)
    out = tmp_path / "out"
    code, stderr = run_segment([SCAN, "--ckpt", path, "-o", out, *FAST])
    assert code == 2 and not out.exists()
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"clipseg3d segment: error: {path}: not a usable clipseg3d checkpoint ({detail}")
    assert lines[0].endswith("); give a checkpoint written by clipseg3d (clipseg3d info CKPT describes one)")


def test_an_output_path_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("keep")
    for out, where in ((target, ""), (target / "sub", f" ({target} is a file)")):
        code, stderr = run_segment([SCAN, "--ckpt", CKPT, "-o", out, *FAST])
        assert code == 2
        assert stderr == (f"clipseg3d segment: error: -o {out} is a file, not a folder{where}; give a folder (it is "
                          "created if missing)")
    assert target.read_text() == "keep" and sorted(tmp_path.iterdir()) == [target]


def test_a_read_only_output_folder_is_refused(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    access = os.access
    if access(locked, os.W_OK):  # root writes anywhere; a read-only mount refuses it as access(2) does here
        monkeypatch.setattr(os, "access", lambda path, mode: access(path, mode) and Path(path) != locked)
    try:
        for out in (locked, locked / "out"):
            code, stderr = run_segment([SCAN, "--ckpt", CKPT, "-o", out, *FAST])
            assert code == 2
            assert stderr == (f"clipseg3d segment: error: -o {out}: {locked} is not writable; make it writable or "
                              "choose another -o")
        assert not any(locked.iterdir())
    finally:
        locked.chmod(0o755)


def test_nan_voxels_are_refused_with_their_count_unless_cleaned(tmp_path):
    image = nib.load(SCAN)
    data = np.asarray(image.dataobj, dtype=np.float32)
    data[:2, 0, 0] = np.nan
    data[0, 1, 0] = np.inf
    inputs = tmp_path / "in"
    inputs.mkdir()
    nib.save(nib.Nifti1Image(data, image.affine), inputs / "nan.nii.gz")
    shutil.copy(SCAN, inputs / "good.nii.gz")
    out = tmp_path / "out"
    code, stderr = run_segment([inputs / "nan.nii.gz", inputs / "good.nii.gz", "--ckpt", CKPT, "-o", out, *FAST])
    assert code == 1
    assert error_lines(stderr) == [
        f"clipseg3d segment: error: {inputs / 'nan.nii.gz'}: 3 of {data.size:,} voxels are NaN or infinite; repair "
        "the scan, or rerun with --clean-nonfinite to replace them with its lowest finite value (air)",
        f"clipseg3d segment: error: 1 of 2 scans failed (listed above); 1 segmented, 0 already done; outputs in {out}"]
    assert sorted(path.name for path in out.iterdir()) == ["good"]  # nothing of the refused scan

    code, stderr = run_segment([inputs / "nan.nii.gz", inputs / "good.nii.gz", "--ckpt", CKPT, "-o", out, *FAST,
                                "--clean-nonfinite"])
    assert code == 0, stderr
    assert (f"warning: {inputs / 'nan.nii.gz'}: 3 of {data.size:,} voxels are NaN or infinite; replaced them with the "
            "scan's lowest finite value") in stderr
    assert "skip: good: already done" in stderr
    assert sorted(path.name for path in out.iterdir()) == ["good", "nan"]


def test_a_class_no_name_matches_is_an_unusable_option(tmp_path):
    out = tmp_path / "out"
    code, stderr = run_segment([SCAN, "--ckpt", CKPT, "-o", out, *FAST, "--classes", "heart"])
    assert code == 2 and not out.exists()
    assert stderr.startswith("clipseg3d segment: error: --classes: no class matches 'heart': best similarity ")
    assert stderr.endswith("; this checkpoint segments liver, liver_tumor, right_kidney, left_kidney")
    assert len(stderr.splitlines()) == 1
