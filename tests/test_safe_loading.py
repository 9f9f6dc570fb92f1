"""Torch files from others are data: a pickle that would run code is refused before any of it runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from clipseg3d.cli.segment import main as segment_main
from clipseg3d.files import UnsafeFileError, load_torch_data
from clipseg3d.models.text_encoder import EmbeddingCache
from clipseg3d.training.finetune import FinetuneError, start_from_checkpoint

from conftest import REPO


class Payload:
    """Unpickling this creates ``marker``: what a planted checkpoint could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def planted(tmp_path) -> tuple[Path, Path]:
    """A checkpoint that looks like clipseg3d's (metadata and weights) with a payload inside."""
    marker = tmp_path / "marker"
    checkpoint = torch.load(REPO / "tests" / "data" / "legacy" / "base.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["payload"] = Payload(marker)
    path = tmp_path / "planted.ckpt"
    torch.save(checkpoint, path)
    return path, marker


def test_the_reader_refuses_a_payload_and_names_what_it_would_call(planted):
    path, marker = planted
    with pytest.raises(UnsafeFileError, match=r"planted\.ckpt: refused: loading it would call \S*system"):
        load_torch_data(path)
    assert not marker.exists()


def test_segment_refuses_the_checkpoint_in_one_line_and_runs_nothing(planted, tmp_path, capsys):
    path, marker = planted
    out = tmp_path / "out"
    code = segment_main([str(REPO / "tests" / "data" / "legacy" / "scan.nii.gz"), "--ckpt", str(path), "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not marker.exists()
    assert any("planted.ckpt: refused" in line for line in err), err
    assert not out.exists() or not any(out.iterdir())


def test_init_from_refuses_the_checkpoint(planted):
    path, marker = planted
    with pytest.raises((FinetuneError, ValueError, RuntimeError), match="refused"):
        start_from_checkpoint(path)
    assert not marker.exists()


def test_a_planted_embedding_cache_entry_is_refused(tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    cache.put("encoder", "a prompt", torch.ones(4))
    assert torch.equal(cache.get("encoder", "a prompt"), torch.ones(4))
    marker = tmp_path / "marker"
    torch.save({"model_id": "encoder", "prompt": "a prompt", "embedding": Payload(marker)},
               cache._path("encoder", "a prompt"))
    with pytest.raises(UnsafeFileError):
        cache.get("encoder", "a prompt")
    assert not marker.exists()
