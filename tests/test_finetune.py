"""Fine-tuning from a checkpoint: new classes through their own residual + adapter, frozen backbone."""

from pathlib import Path

import pytest
import torch

from clipseg3d.inference.sliding_window import class_predictor
from clipseg3d.models.backbones import UNetBackbone
from clipseg3d.models.checkpoint import CHECKPOINT_KEY, load_model
from clipseg3d.training.finetune import FinetuneError, freeze, start_from_checkpoint
from clipseg3d.training.task import UniversalSegmentation

START_CLASSES = ["liver", "spleen", "right_kidney"]


def small_backbone() -> UNetBackbone:
    return UNetBackbone(channels=(8, 16, 32), strides=(2, 2), out_channels=16, num_res_units=1)


def save_task(task: UniversalSegmentation, path: Path) -> Path:
    """A checkpoint as the trainer writes it (state dict + clipseg3d metadata), without training."""
    checkpoint = {"state_dict": task.state_dict()}
    task.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def start_ckpt(tmp_path_factory) -> Path:
    """An untrained but randomised start: every weight away from its initial value."""
    torch.manual_seed(0)
    task = UniversalSegmentation(classes=START_CLASSES, backbone=small_backbone(), head_hidden=32, roi_size=(16,) * 3)
    with torch.no_grad():
        for param in task.model.head.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return save_task(task, tmp_path_factory.mktemp("start") / "start.ckpt")


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(3))


def randomise(params, scale: float = 0.2) -> None:
    """Move parameters as training might."""
    with torch.no_grad():
        for param in params:
            param.add_(scale * torch.randn_like(param))


def test_added_classes_leave_the_old_outputs_bit_for_bit_as_they_were(start_ckpt, image):
    start, _ = load_model(start_ckpt)
    point = start_from_checkpoint(start_ckpt, START_CLASSES + ["stomach", "aorta"])
    model = point.model.eval()
    assert point.new_classes == ["stomach", "aorta"] and point.old_classes == START_CLASSES
    assert model.adapted_classes == ["stomach", "aorta"]
    with torch.no_grad():
        before = start(image)
        added = model(image)
        assert torch.equal(added[:, :3], before)
        # however far the new classes' residuals and adapters move, the old logits stay put
        randomise([*model.class_residuals.parameters(), *model.head.adapters.parameters()])
        trained = model(image)
    assert torch.equal(trained[:, :3], before)
    assert (trained[:, 3:] - added[:, 3:]).abs().amax(dim=(0, 2, 3, 4)).min() > 1e-2


def test_reordered_old_classes_keep_their_outputs_to_rounding(start_ckpt, image):
    """Reordering classes changes the batched products' kernels, so float32 outputs may differ at
    rounding; in float64 that rounding is 1e-16 relative, so the check can be tight on any CPU."""
    start, _ = load_model(start_ckpt)
    model = start_from_checkpoint(start_ckpt, ["spleen", "stomach", "liver"]).model.eval()
    randomise([*model.class_residuals.parameters(), *model.head.adapters.parameters()])
    with torch.no_grad():
        before, after = start.double()(image.double()), model.double()(image.double())
    scale = before.abs().max().item()
    assert scale > 1e-2
    torch.testing.assert_close(after[:, [0, 2]], before[:, [1, 0]], rtol=1e-12, atol=1e-12 * scale)
    with torch.no_grad():  # float32, to its precision at the logits' magnitude
        before, after = start.float()(image), model.float()(image)
    torch.testing.assert_close(after[:, [0, 2]], before[:, [1, 0]], rtol=1e-5, atol=1e-5 * scale)


def test_adapter_of_a_new_class_is_its_own(start_ckpt, image):
    model = start_from_checkpoint(start_ckpt, START_CLASSES + ["stomach", "aorta"]).model.eval()
    with torch.no_grad():
        reference = model(image)
        randomise(model.head.adapters[0].parameters())  # stomach's adapter only
        changed = model(image)
    assert torch.equal(changed[:, [0, 1, 2, 4]], reference[:, [0, 1, 2, 4]])
    assert not torch.allclose(changed[:, 3], reference[:, 3])


def test_a_subset_of_classes_predicts_what_the_full_model_does(start_ckpt, image):
    """`clipseg3d segment --classes` selects rows of class_inputs(): adapter slots must follow their rows."""
    model = start_from_checkpoint(start_ckpt, START_CLASSES + ["stomach", "aorta"]).model.eval()
    randomise(model.class_residuals.parameters())
    randomise(model.head.adapters.parameters())
    with torch.no_grad():
        full = model(image)
        for rows in ([4], [3, 1], [0, 4, 2]):
            torch.testing.assert_close(class_predictor(model, rows)(image), full[:, rows], rtol=1e-5,
                                       atol=1e-5 * full.abs().max().item())


def test_new_class_embeddings_come_from_the_checkpoint_encoder(start_ckpt, tiny_clip):
    start = torch.load(start_ckpt, weights_only=False)[CHECKPOINT_KEY]
    with pytest.raises(FinetuneError, match=f"{start_ckpt}: its class embeddings come from text encoder "
                                            f"'{start['text_encoder']}'.*not '{tiny_clip}'"):
        start_from_checkpoint(start_ckpt, ["liver", "stomach"], text_encoder=str(tiny_clip))
    same = start_from_checkpoint(start_ckpt, ["liver", "stomach"], text_encoder=start["text_encoder"]).model
    fresh = UniversalSegmentation(classes=["stomach"], backbone=small_backbone(), head_hidden=32).model
    assert torch.equal(same.class_embeddings[1], fresh.class_embeddings[0])


@pytest.mark.parametrize("mode, trains", [
    ("full", {"backbone", "head", "residual", "adapter"}),
    ("head", {"head", "residual", "adapter"}),
    ("new_classes", {"residual", "adapter"}),
])
def test_freeze_modes_choose_what_trains(start_ckpt, mode, trains):
    point = start_from_checkpoint(start_ckpt, START_CLASSES + ["stomach"])
    model = point.model
    freeze(model, mode, point.new_classes)
    parts = {"backbone": model.backbone.parameters(), "residual": model.class_residuals.parameters(),
             "adapter": model.head.adapters.parameters(),
             "head": (p for name, p in model.head.named_parameters() if not name.startswith("adapters."))}
    assert {part for part, params in parts.items() if all(p.requires_grad for p in params)} == trains
    trainable = sum(param.numel() for param in model.parameters() if param.requires_grad)
    if mode == "new_classes":
        rank, width, channels = model.adapter_rank, 2 * model.head_args["hidden"], model.head.channels
        controller = rank * width + model.head.num_params * (rank + 1)
        between = 2 * channels  # 3x3x3 conv to twice the head's width, ReLU, 3x3x3 conv back
        features = (model.backbone.out_channels * 27 + 1) * between + (between * 27 + 1) * channels
        assert trainable == model.class_embeddings.shape[1] + controller + features


def test_finetuned_checkpoint_rebuilds_with_its_adapters_and_extends_again(start_ckpt, image, tmp_path):
    task = UniversalSegmentation(classes=START_CLASSES + ["stomach"], init_from=str(start_ckpt),
                                 finetune="new_classes", roi_size=(16,) * 3)
    randomise(task.trainable_parameters())
    path = save_task(task, tmp_path / "tuned.ckpt")
    model, meta = load_model(path)
    assert meta["adapters"] == {"classes": ["stomach"], "rank": 4}
    assert meta["finetune"] == {"init_from": str(start_ckpt), "mode": "new_classes", "new_classes": ["stomach"]}
    with torch.no_grad():
        expected = task.model.eval()(image)
        assert torch.equal(model(image), expected)
    # a second round keeps stomach's own parameters and adds aorta with fresh ones
    again = start_from_checkpoint(path, ["stomach", "aorta", "liver"]).model.eval()
    assert again.adapted_classes == ["stomach", "aorta"]
    with torch.no_grad():
        torch.testing.assert_close(again(image)[:, [0, 2]], expected[:, [3, 0]], rtol=1e-5,
                                   atol=1e-5 * expected.abs().max().item())


def test_task_keeps_a_frozen_backbone_in_eval_mode(start_ckpt):
    task = UniversalSegmentation(classes=START_CLASSES + ["stomach"], init_from=str(start_ckpt),
                                 finetune="head", roi_size=(16,) * 3)
    task.train()
    assert task.training and task.model.head.training
    assert not any(module.training for module in task.model.backbone.modules())
    assert not any(module.training for module in task.starting_head.modules())


def test_keeping_the_old_classes_holds_them_to_the_start_where_the_data_do_not_label_them(start_ckpt, image):
    classes = START_CLASSES + ["stomach"]
    task = UniversalSegmentation(classes=classes, init_from=str(start_ckpt), finetune="head", keep_old_classes=1.0,
                                 roi_size=(16,) * 3).train()
    head = [param for param in task.model.head.parameters() if param.requires_grad]
    only_new = torch.tensor([[name == "stomach" for name in classes]] * 2)

    def keep_loss(labelled: torch.Tensor) -> torch.Tensor:
        decoder_map, global_feature = task.model.backbone(image)
        logits = task.model.head(decoder_map, global_feature, *task.model.class_inputs())
        return task.starting_head.keep_loss(logits, task.starting_head(decoder_map, global_feature), labelled)

    at_start = keep_loss(only_new)
    grads = [grad for grad in torch.autograd.grad(at_start, head, allow_unused=True) if grad is not None]
    assert grads and max(grad.abs().max() for grad in grads) < 1e-6  # at its minimum: the old outputs as they were
    randomise(head, scale=0.02)
    moved = keep_loss(only_new)
    assert moved > at_start + 1e-3
    moved.backward()
    norm = torch.sqrt(sum((param.grad ** 2).sum() for param in head if param.grad is not None))
    with torch.no_grad():
        for param in head:
            if param.grad is not None:
                param -= 1e-2 / norm * param.grad
    assert keep_loss(only_new) < moved  # its gradient leads back
    assert keep_loss(torch.ones_like(only_new)) == 0  # labelled pairs learn from their labels only


@pytest.mark.parametrize("kwargs, message", [
    ({"finetune": "head"}, "finetune='head' needs a trained checkpoint to start from"),
    ({"init_from": "START", "finetune": "new_classes", "classes": START_CLASSES},
     "finetune='new_classes': the class list adds nothing to"),
    ({"init_from": "START", "backbone": "small"}, "brings its own backbone; leave 'backbone' unset"),
    ({"init_from": "START", "classes": ["liver", "Liver"]}, "names 'liver' twice"),
    ({"init_from": "START", "finetune": "new_classes", "classes": START_CLASSES + ["stomach"], "keep_old_classes": 1.0},
     "keep_old_classes=1.0: a weight >= 0 that applies to finetune='head' only, not 'new_classes'"),
])
def test_bad_finetune_requests_are_one_line_errors(start_ckpt, kwargs, message):
    kwargs = {key: str(start_ckpt) if value == "START" else small_backbone() if value == "small" else value
              for key, value in kwargs.items()}
    with pytest.raises(FinetuneError, match=message):
        UniversalSegmentation(**kwargs)
