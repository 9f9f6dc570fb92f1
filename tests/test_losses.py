import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipseg3d.data.synthetic import synthetic_volume
from clipseg3d.training.losses import PartialLabelLoss


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 5, 5, 5, generator=g, requires_grad=True)
    target = (torch.rand(2, 3, 5, 5, 5, generator=g) > 0.5).float()
    return logits, target


def test_unlabelled_pairs_get_exactly_zero_gradient():
    logits, target = _batch()
    labelled = torch.tensor([[True, False, True], [False, False, True]])
    PartialLabelLoss()(logits, target, labelled).backward()
    grad_norm = logits.grad.flatten(2).abs().sum(-1)
    assert torch.all(grad_norm[~labelled] == 0)
    assert torch.all(grad_norm[labelled] > 0)


def test_sample_that_labels_nothing_contributes_nothing():
    logits, target = _batch(1)
    loss = PartialLabelLoss()
    both = loss(logits, target, torch.tensor([[True, True, False], [False, False, False]]))
    first_only = loss(logits[:1], target[:1], torch.tensor([[True, True, False]]))
    torch.testing.assert_close(both, first_only)
    nothing = loss(logits, target, torch.zeros(2, 3, dtype=torch.bool))
    assert nothing.item() == 0.0


def test_loss_value_is_bce_plus_dice_over_labelled_pairs():
    logits, target = _batch(2)
    labelled = torch.tensor([[True, False, False], [False, True, False]])
    value = PartialLabelLoss(bce_weight=0.5, dice_weight=2.0, smooth=1.0)(logits, target, labelled)
    expected = []
    for b, k in [(0, 0), (1, 1)]:
        x, t = logits[b, k].flatten(), target[b, k].flatten()
        p = torch.sigmoid(x)
        dice = 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
        expected.append(0.5 * F.binary_cross_entropy_with_logits(x, t) + 2.0 * dice)
    torch.testing.assert_close(value, torch.stack(expected).mean())


def per_pair_formula(logits, target, labelled, bce_weight, dice_weight, smooth):
    """The loss as written before it used MONAI: the mean over labelled pairs of weighted BCE + soft Dice."""
    chosen = logits.flatten(2)[labelled]
    truth = target.flatten(2)[labelled]
    probs = torch.sigmoid(chosen)
    dice = 1.0 - (2.0 * (probs * truth).sum(-1) + smooth) / (probs.sum(-1) + truth.sum(-1) + smooth)
    bce = F.binary_cross_entropy_with_logits(chosen, truth, reduction="none").mean(-1)
    return (bce_weight * bce + dice_weight * dice).mean()


@pytest.mark.parametrize("bce_weight, dice_weight, smooth", [(1.0, 1.0, 1.0), (0.3, 2.5, 1.0), (1.0, 0.0, 0.5)])
def test_loss_and_gradient_equal_the_per_pair_formula(bce_weight, dice_weight, smooth):
    g = torch.Generator().manual_seed(4)
    logits = (3.0 * torch.randn(3, 4, 6, 7, 5, generator=g)).requires_grad_(True)
    target = (torch.rand(3, 4, 6, 7, 5, generator=g) > 0.7).float()
    labelled = torch.tensor([[True, False, True, True], [False, False, False, True], [True, True, False, False]])
    value = PartialLabelLoss(bce_weight, dice_weight, smooth)(logits, target, labelled)
    (grad,) = torch.autograd.grad(value, logits)
    reference = per_pair_formula(logits, target, labelled, bce_weight, dice_weight, smooth)
    (reference_grad,) = torch.autograd.grad(reference, logits)
    eps = torch.finfo(torch.float32).eps
    assert value.item() > 0.1
    torch.testing.assert_close(value, reference, rtol=16 * eps, atol=0.0)
    torch.testing.assert_close(grad, reference_grad, rtol=64 * eps, atol=64 * eps * reference_grad.abs().max().item())



def test_without_dice_on_empty_a_crop_missing_its_class_gets_bce_only():
    g = torch.Generator().manual_seed(5)
    logits = (2.0 * torch.randn(2, 3, 6, 5, 4, generator=g)).requires_grad_(True)
    target = (torch.rand(2, 3, 6, 5, 4, generator=g) > 0.6).float()
    target[0, 1] = 0.0  # labelled, but absent from this crop
    target[1, 2] = 0.0
    labelled = torch.tensor([[True, True, False], [True, False, True]])
    value = PartialLabelLoss(0.5, 2.0, 1.0, dice_on_empty=False)(logits, target, labelled)
    (grad,) = torch.autograd.grad(value, logits)
    chosen, truth = logits.flatten(2)[labelled], target.flatten(2)[labelled]
    bce = F.binary_cross_entropy_with_logits(chosen, truth)
    holds = truth.sum(-1) > 0
    probs = torch.sigmoid(chosen[holds])
    dice = 1.0 - (2.0 * (probs * truth[holds]).sum(-1) + 1.0) / (probs.sum(-1) + truth[holds].sum(-1) + 1.0)
    reference = 0.5 * bce + 2.0 * dice.mean()
    (reference_grad,) = torch.autograd.grad(reference, logits)
    eps = torch.finfo(torch.float32).eps
    assert holds.tolist() == [True, False, True, False]
    torch.testing.assert_close(value, reference, rtol=16 * eps, atol=0.0)
    torch.testing.assert_close(grad, reference_grad, rtol=64 * eps, atol=64 * eps * reference_grad.abs().max().item())
    # the default scores the empty pairs' Dice too, which is larger than their BCE-only term here
    assert PartialLabelLoss(0.5, 2.0, 1.0)(logits, target, labelled).item() > value.item() + 0.1
    nothing_present = PartialLabelLoss(dice_on_empty=False)(logits, torch.zeros_like(target), labelled)
    torch.testing.assert_close(nothing_present, F.binary_cross_entropy_with_logits(chosen, torch.zeros_like(truth)),
                               rtol=16 * eps, atol=0.0)


def test_generated_organ_targets_include_their_tumour_voxels():
    names = ["liver", "spleen", "liver_tumor"]
    _, targets = synthetic_volume(names, (24, 24, 24), np.random.default_rng(0))
    tumour, liver = targets[2].astype(bool), targets[0].astype(bool)
    assert tumour.sum() > 20
    assert np.all(liver[tumour])
