import pytest
import torch

from clipseg3d.models.text_encoder import (
    MINILM,
    EmbeddingCache,
    TextEncoder,
    TextEncoderError,
    embed_prompts,
)

PROMPT = "A computerized tomography of a liver tumor"
CLIP_IDS = [49406, 320, 11639, 704, 7690, 999, 22399, 539, 320, 12639, 22616, 49407]


def test_clip_path_tokenises_like_openai_clip_and_embeds_with_the_projection(tiny_clip):
    encoder = TextEncoder(str(tiny_clip))
    assert encoder.kind == "clip"
    assert encoder.tokenizer(PROMPT)["input_ids"] == CLIP_IDS
    embeddings = encoder.encode([PROMPT, "A computerized tomography of a spleen"])
    assert embeddings.shape == (2, 24)  # projection_dim, not hidden_size
    assert not torch.allclose(embeddings[0], embeddings[1])


def test_bundled_minilm_gives_meaningful_sentence_embeddings():
    encoder = TextEncoder(MINILM)
    assert encoder.kind == "sentence"
    liver, liver_tumour, femur = encoder.encode(
        ["A computerized tomography of a liver", "A computerized tomography of a liver tumor",
         "A computerized tomography of a left head of femur"])
    assert liver.shape == (384,)
    torch.testing.assert_close(liver.norm(), torch.tensor(1.0))
    assert liver @ liver_tumour > liver @ femur


def test_embeddings_are_computed_once_per_encoder_and_prompt(tmp_path, tiny_clip):
    class Counting(TextEncoder):
        calls: list = []

        def encode(self, prompts):
            self.calls.append(list(prompts))
            return super().encode(prompts)

    cache = EmbeddingCache(tmp_path)
    encoder = Counting(str(tiny_clip))
    first = embed_prompts(["a", "b", "a"], str(tiny_clip), cache, encoder)
    second = embed_prompts(["b", "c"], str(tiny_clip), cache, encoder)
    assert Counting.calls == [["a", "b"], ["c"]]
    torch.testing.assert_close(first[1], second[0])
    torch.testing.assert_close(first[0], first[2])
    other = EmbeddingCache(tmp_path).get("another-encoder", "a")
    assert other is None


def test_missing_weights_offline_name_the_model_and_how_to_supply_it():
    with pytest.raises(TextEncoderError) as err:
        TextEncoder("openai/clip-vit-base-patch32").encode(["x"])
    message = str(err.value)
    assert "openai/clip-vit-base-patch32" in message and "local folder" in message and "cache" in message


def test_a_tokenizer_without_its_vocabulary_is_an_error(tmp_path, tiny_clip):
    import json
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_clip, broken)
    (broken / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1}))
    (broken / "merges.txt").write_text("#version: 0.2\n")
    for extra in ("tokenizer.json",):
        (broken / extra).unlink(missing_ok=True)
    with pytest.raises(TextEncoderError, match="only 2 tokens"):
        TextEncoder(str(broken)).encode(["x"])
