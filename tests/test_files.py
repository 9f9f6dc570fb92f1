"""Atomic writes: complete or absent, and readable as the user's umask says."""

from __future__ import annotations

import os
import stat

import pytest

from clipseg3d.files import replace_atomically, write_json_atomic


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = write_json_atomic(tmp_path / "report.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert path.read_text() == '{\n  "a": 1\n}\n'


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "labels.nii.gz"
    path.write_text("before")

    def fail(temp):
        temp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        replace_atomically(path, fail)
    assert path.read_text() == "before"
    assert [item.name for item in tmp_path.iterdir()] == ["labels.nii.gz"]
