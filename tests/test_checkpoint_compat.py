"""Checkpoints written by earlier versions load under the same state-dict keys and give their stored logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipseg3d.models.checkpoint import load_model, read_checkpoint

from conftest import REPO

LEGACY = REPO / "tests" / "data" / "legacy"
EPS32 = float(np.finfo(np.float32).eps)


@pytest.mark.parametrize("name, adapted", [("base", []), ("adapted", ["spleen"])])
def test_a_legacy_checkpoint_gives_its_stored_logits(name, adapted):
    model, _ = load_model(LEGACY / f"{name}.ckpt")
    stored = read_checkpoint(LEGACY / f"{name}.ckpt")["state_dict"]
    assert sorted(f"model.{key}" for key in model.state_dict()) == sorted(stored)
    assert model.adapted_classes == adapted
    expected = torch.from_numpy(np.load(LEGACY / f"{name}_logits.npy"))
    with torch.no_grad():
        logits = model(torch.load(LEGACY / "input.pt"))
    assert logits.shape == expected.shape
    scale = float(expected.abs().max())
    assert scale > 10.0  # logits spread enough for the check to mean something
    torch.testing.assert_close(logits, expected, rtol=16 * EPS32, atol=16 * EPS32 * scale)


def test_an_adapted_class_differs_from_what_the_shared_head_alone_gives():
    """The adapter slot really routes the added class through its adapter (its update is not zero)."""
    model, _ = load_model(LEGACY / "adapted.ckpt")
    image = torch.load(LEGACY / "input.pt")
    embeddings, slots = model.class_inputs()
    assert slots.tolist() == [-1, -1, -1, -1, 0]
    with torch.no_grad():
        decoder_map, global_feature = model.backbone(image)
        with_adapter = model.head(decoder_map, global_feature, embeddings, slots)
        without = model.head(decoder_map, global_feature, embeddings, torch.full_like(slots, -1))
    assert torch.equal(with_adapter[:, :4], without[:, :4])
    assert (with_adapter[:, 4] - without[:, 4]).abs().max() > 1e-2
