"""CLIP image embeddings of I_f / I_b: shape, determinism, npy codec, save/load round trip."""

from __future__ import annotations

import numpy as np
import pytest

from cnc_model.annotators.clip_embed import ClipImageEmbedder, decode_npy, encode_npy


@pytest.fixture(scope="module")
def embedder() -> ClipImageEmbedder:
    return ClipImageEmbedder.tiny(seed=0)


def images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40, 40, 3), dtype=np.uint8) for _ in range(n)]


def test_one_embedding_per_image(embedder):
    emb = embedder.embed(images(3))
    assert emb.shape == (3, embedder.model.config.projection_dim) and emb.dtype == np.float32
    assert np.isfinite(emb).all()
    assert not np.allclose(emb[0], emb[1])
    assert embedder.embed([]).shape == (0, embedder.model.config.projection_dim)


def test_embedding_is_deterministic_and_row_wise(embedder):
    x = images(3, seed=1)
    batched = embedder.embed(x)
    single = np.concatenate([embedder.embed([im]) for im in x])
    assert np.array_equal(embedder.embed(x), batched)
    assert np.allclose(batched, single, atol=1e-5)


def test_npy_codec_is_exact():
    a = np.random.default_rng(0).standard_normal(32).astype(np.float32)
    b = decode_npy(encode_npy(a))
    assert b.dtype == np.float32 and np.array_equal(a, b)


def test_save_and_load_give_the_same_embeddings(embedder, tmp_path):
    embedder.save_pretrained(tmp_path / "clip")
    loaded = ClipImageEmbedder.from_pretrained(tmp_path / "clip", device="cpu")
    x = images(2, seed=3)
    assert np.array_equal(loaded.embed(x), embedder.embed(x))
