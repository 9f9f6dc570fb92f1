import pytest
import torch
import torch.nn.functional as F

import clipseg3d.models.head as head_module
from clipseg3d.models.head import DynamicHead


def naive_head(head: DynamicHead, decoder_map, global_feature, embeddings):
    """Reference: one image, one class, one conv3d at a time."""
    features = head.feature_proj(decoder_map)
    params = head.class_parameters(global_feature, embeddings)
    batch, classes = params.shape[:2]
    out = []
    for b in range(batch):
        per_class = []
        for k in range(classes):
            x = features[b:b + 1]
            offset = 0
            for layer, (o, i) in enumerate(head.layer_shapes):
                w = params[b, k, offset:offset + o * i].reshape(o, i, 1, 1, 1)
                offset += o * i
                bias = params[b, k, offset:offset + o]
                offset += o
                x = F.conv3d(x, w, bias)
                if layer < len(head.layer_shapes) - 1:
                    x = F.relu(x)
            per_class.append(x[0, 0])
        out.append(torch.stack(per_class))
    return torch.stack(out)


@pytest.mark.parametrize("chunk_voxels", [4096, 1000, 7])
def test_chunked_head_equals_naive_reference(chunk_voxels):
    torch.manual_seed(0)
    head = DynamicHead(decoder_channels=16, global_channels=32, text_dim=24, hidden=64, chunk_voxels=chunk_voxels)
    decoder_map = torch.randn(2, 16, 9, 10, 11)
    global_feature = torch.randn(2, 32)
    embeddings = torch.randn(5, 24)
    fast = head(decoder_map, global_feature, embeddings)
    reference = naive_head(head, decoder_map, global_feature, embeddings)
    assert fast.shape == (2, 5, 9, 10, 11)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


@pytest.mark.parametrize("classes, chunk_voxels, group", [(1, 4096, 1), (7, 64, 3), (40, 7, 6), (40, 1000, 40)])
def test_class_groups_and_chunks_equal_naive_reference(classes, chunk_voxels, group):
    torch.manual_seed(3)
    head = DynamicHead(decoder_channels=16, global_channels=8, text_dim=6, hidden=16, chunk_voxels=chunk_voxels)
    decoder_map, global_feature, embeddings = torch.randn(2, 16, 7, 8, 9), torch.randn(2, 8), torch.randn(classes, 6)
    _, step = head.inference_blocks(classes, 7 * 8 * 9)
    head.working_set_bytes = group * 4 * head.channels * step
    assert head.inference_blocks(classes, 7 * 8 * 9) == (group, min(chunk_voxels, 504))
    with torch.no_grad():
        fast = head(decoder_map, global_feature, embeddings)
        reference = naive_head(head, decoder_map, global_feature, embeddings)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


def test_inference_blocks_keep_a_fixed_working_set():
    head = DynamicHead(decoder_channels=16, global_channels=8, text_dim=6)
    blocks = {classes: head.inference_blocks(classes, 96 ** 3) for classes in (32, 128, 512)}
    assert blocks[32] == blocks[128] == blocks[512] == (32, 512)  # 8 channels: 16 KiB per class, 512 KiB per group
    assert head.inference_blocks(5, 96 ** 3) == (5, 512)
    assert head.inference_blocks(512, 100) == (163, 100)  # a small window: all its voxels, more classes at once


def test_head_gradients_match_reference():
    torch.manual_seed(1)
    head = DynamicHead(decoder_channels=16, global_channels=8, text_dim=6, hidden=16, chunk_voxels=50)
    inputs = (torch.randn(1, 16, 6, 6, 6), torch.randn(1, 8), torch.randn(3, 6))
    weight = torch.randn(1, 3, 6, 6, 6)
    grads = []
    for fn in (head, lambda *a: naive_head(head, *a)):
        head.zero_grad()
        (fn(*inputs) * weight).sum().backward()
        grads.append(head.controller.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-4 * grads[1].abs().max().item())


def test_class_count_follows_the_embedding_table():
    head = DynamicHead(decoder_channels=16, global_channels=8, text_dim=6)
    decoder_map, global_feature = torch.randn(1, 16, 4, 4, 4), torch.randn(1, 8)
    assert head(decoder_map, global_feature, torch.randn(1, 6)).shape[1] == 1
    assert head(decoder_map, global_feature, torch.randn(40, 6)).shape[1] == 40
    assert head.num_params == 8 * 8 + 8 + 8 * 8 + 8 + 8 + 1


def test_adapter_slots_route_each_class_through_its_own_adapter():
    torch.manual_seed(2)
    head = DynamicHead(decoder_channels=16, global_channels=8, text_dim=6, hidden=16, adapters=2)
    for adapter in head.adapters:  # away from their zero start
        for param in adapter.parameters():
            param.data.add_(0.1 * torch.randn_like(param))
    decoder_map, global_feature, embeddings = torch.randn(2, 16, 5, 5, 5), torch.randn(2, 8), torch.randn(4, 6)
    slots = torch.tensor([1, -1, 0, -1])
    with torch.no_grad():
        logits = head(decoder_map, global_feature, embeddings, slots)
        plain = head(decoder_map, global_feature, embeddings)
        for k in range(4):  # each class alone, with its slot, gives its column
            alone = head(decoder_map, global_feature, embeddings[k:k + 1], slots[k:k + 1])
            torch.testing.assert_close(alone[:, 0], logits[:, k], rtol=1e-5, atol=1e-5 * logits.abs().max().item())
        swapped = head(decoder_map, global_feature, embeddings, torch.tensor([0, -1, 1, -1]))
    # rows without an adapter: as the plain head gives them (another batch of classes: to rounding)
    torch.testing.assert_close(logits[:, [1, 3]], plain[:, [1, 3]], rtol=1e-5, atol=1e-5 * plain.abs().max().item())
    for k in (0, 2):
        assert (logits[:, k] - plain[:, k]).abs().max() > 1e-2  # the adapter acts on its class
        assert (logits[:, k] - swapped[:, k]).abs().max() > 1e-2  # and which adapter matters
    with pytest.raises(ValueError, match="adapter slots"):
        head(decoder_map, global_feature, embeddings, torch.tensor([2, -1, -1, -1]))


def fused_case(classes: int, seed: int = 5, decoder_channels: int = 16):
    torch.manual_seed(seed)
    head = DynamicHead(decoder_channels=decoder_channels, global_channels=32, text_dim=24, hidden=64).eval()
    with torch.no_grad():  # a group norm that is not the identity's affine
        head.feature_proj[0].weight.uniform_(0.5, 1.5)
        head.feature_proj[0].bias.uniform_(-0.5, 0.5)
    decoder_map = 3.0 * torch.randn(2, decoder_channels, 9, 10, 11) + torch.randn(2, decoder_channels, 1, 1, 1)
    return head, decoder_map, torch.randn(2, 32), torch.randn(classes, 24)


# one padded class group, two (the second padded); group norms of 1, 3 and 20 channels per group
@pytest.mark.parametrize("classes, decoder_channels", [(5, 16), (40, 16), (5, 48), (5, 20)])
def test_the_fused_layers_pad_groups_and_chunks_and_equal_naive_reference(classes, decoder_channels, monkeypatch):
    # the kernels' arithmetic and padding, run eagerly (compiling them is the slow test below);
    # 990 voxels in chunks of 512: the second chunk padded
    monkeypatch.setattr(head_module, "compiled", lambda function: function)
    monkeypatch.setattr(head_module, "FUSED_VOXELS", 512)
    head, decoder_map, global_feature, embeddings = fused_case(classes, decoder_channels=decoder_channels)
    assert head.feature_proj[0].num_groups == (1 if decoder_channels == 20 else 16)
    head.fused = True
    with torch.no_grad():
        fused = head(decoder_map, global_feature, embeddings)
        reference = naive_head(head, decoder_map, global_feature, embeddings)
    assert fused.shape == (2, classes, 9, 10, 11)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())


@pytest.mark.slow  # compiles the kernel (tens of seconds on 2 cores)
@pytest.mark.parametrize("classes", [5, 40])
def test_the_compiled_head_equals_naive_reference(classes):
    head, decoder_map, global_feature, embeddings = fused_case(classes)
    head.fused = True
    with torch.no_grad():
        fused = head(decoder_map, global_feature, embeddings)
        reference = naive_head(head, decoder_map, global_feature, embeddings)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())
