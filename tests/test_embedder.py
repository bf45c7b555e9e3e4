import numpy as np
import pytest
from PIL import Image, ImageDraw

from mmpersona.errors import ImageLoadError, MmpersonaError


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        img = Image.new("RGB", (int(rng.integers(30, 90)), int(rng.integers(30, 90))), tuple(rng.integers(0, 255, 3)))
        ImageDraw.Draw(img).ellipse((5, 5, 25, 25), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        out.append(img)
    return out


def test_records_name_and_dim(tiny_embedder):
    assert tiny_embedder.name == "tiny:clip"
    assert tiny_embedder.dim == 32


def test_unit_norm_float32(tiny_embedder):
    img = tiny_embedder.embed_images(_images(5))
    txt = tiny_embedder.embed_texts(["a dog", "my shiba inu <bo>", ""])
    for arr, n in ((img, 5), (txt, 3)):
        assert arr.dtype == np.float32 and arr.shape == (n, 32)
        np.testing.assert_allclose(np.linalg.norm(arr, axis=1), 1.0, rtol=1e-5)


def test_deterministic_and_batched_equals_single(tiny_embedder):
    images = _images(7)
    batched = tiny_embedder.embed_images(images, batch_size=3)
    single = np.concatenate([tiny_embedder.embed_images([im]) for im in images])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    np.testing.assert_array_equal(batched, tiny_embedder.embed_images(images, batch_size=3))
    texts = ["a red ball", "a blue box", "a green tree", "my cat"]
    np.testing.assert_allclose(tiny_embedder.embed_texts(texts, batch_size=2),
                               np.concatenate([tiny_embedder.embed_texts([t]) for t in texts]), atol=1e-5)
    assert not np.allclose(batched[0], batched[1]), "different images must not embed identically"


def test_real_clip_tokenizer(tiny_embedder):
    import open_clip

    ids = tiny_embedder.tokenizer(["a photo of a dog"])
    np.testing.assert_array_equal(ids.numpy(), open_clip.tokenize(["a photo of a dog"]).numpy())
    assert int(ids.max()) == 49407  # <|endoftext|> of the full 49408-token vocabulary


def test_accepts_paths_and_bytes(tiny_embedder, tmp_path):
    img = _images(1)[0]
    path = tmp_path / "a.png"
    img.save(path)
    a, b, c = tiny_embedder.embed_images([img, path, path.read_bytes()])
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(b, c, atol=1e-6)


def test_empty_input(tiny_embedder):
    assert tiny_embedder.embed_images([]).shape == (0, 32)
    assert tiny_embedder.embed_texts([]).shape == (0, 32)


def test_bad_inputs(tiny_embedder, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageLoadError, match="broken.jpg"):
        tiny_embedder.embed_images([_images(1)[0], bad])
    with pytest.raises(MmpersonaError, match="item 1 is int"):
        tiny_embedder.embed_texts(["ok", 3])
    with pytest.raises(MmpersonaError, match="batch_size"):
        tiny_embedder.embed_texts(["ok"], batch_size=0)
