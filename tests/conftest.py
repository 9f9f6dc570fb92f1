"""Shared test set-up: offline hubs, offline wandb, a private embedding cache, shared fixtures."""

import os
import tempfile
from pathlib import Path

import pytest

_SCRATCH = Path(tempfile.mkdtemp(prefix="clipseg3d-tests-"))
os.environ.update({
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_DIR": str(_SCRATCH / "wandb"),
    "WANDB_CACHE_DIR": str(_SCRATCH / "wandb-cache"),
    "WANDB_DATA_DIR": str(_SCRATCH / "wandb-data"),
    "WANDB_SILENT": "true",
    "CLIPSEG3D_CACHE": str(_SCRATCH / "cache"),
})

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]


def shared_data(name: str) -> Path:
    """A folder of ../shared/data, or skip the test when it is absent."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real test data {path} is absent (it ships beside the project, not in it)")
    return path


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A tiny randomly initialised CLIP text model saved beside the real CLIP vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    vocab = shared_data("clip-tokenizer")
    folder = tmp_path_factory.mktemp("tiny-clip")
    config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, projection_dim=24)
    CLIPTextModelWithProjection(config).save_pretrained(folder)
    CLIPTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt")).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny models: their tensors are small, and the thread pool's
    overhead costs several-fold (use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
