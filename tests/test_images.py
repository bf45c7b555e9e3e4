import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from mmpersona.errors import ImageLoadError
from mmpersona.images import load_image


def png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and header claiming `width` x `height`, with a tiny payload: a decompression bomb
    shape that must be refused from its header, before any decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------ bad input


def test_missing_file(tmp_path):
    with pytest.raises(ImageLoadError, match="not found"):
        load_image(tmp_path / "nope.png")


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image(tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty") as err:
        load_image(path)
    assert "empty.jpg" in str(err.value)


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is a text file pretending to be a PNG")
    with pytest.raises(ImageLoadError, match="not a recognised image"):
        load_image(path)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated(tmp_path, fmt):
    rng = np.random.default_rng(0)
    data = png_bytes(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), format=fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="truncated or corrupt") as err:
        load_image(path)
    assert str(path) in str(err.value)


def test_decompression_bomb_refused_from_header():
    with pytest.raises(ImageLoadError, match="over the limit"):
        load_image(png_header_only(100_000, 100_000))


def test_pixel_limit_is_configurable():
    data = png_bytes(Image.new("RGB", (20, 20)))
    with pytest.raises(ImageLoadError, match="400 pixels"):
        load_image(data, max_pixels=399)
    assert load_image(data, max_pixels=400).size == (20, 20)


def test_byte_limit(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes(Image.new("RGB", (32, 32))))
    with pytest.raises(ImageLoadError, match="over the limit"):
        load_image(path, max_bytes=10)


def test_unsupported_input_type():
    with pytest.raises(ImageLoadError, match="expected a path"):
        load_image(12345)


# ------------------------------------------------------------------------------------------ odd but valid


def test_palette_with_transparency_composited_on_white():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    img.putpixel((0, 0), 1)
    data = png_bytes(img, transparency=0)
    out = load_image(data)
    assert out.mode == "RGB"
    assert out.getpixel((1, 1)) == (255, 255, 255)  # transparent red -> white
    assert out.getpixel((0, 0)) == (0, 0, 255)


def test_cmyk_jpeg():
    data = png_bytes(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), format="JPEG")
    out = load_image(data)
    r, g, b = out.getpixel((4, 4))
    assert out.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_16bit_greyscale_is_scaled_not_clipped():
    arr = np.full((4, 4), 32768, dtype=np.uint16)
    data = png_bytes(Image.fromarray(arr))
    out = load_image(data)
    assert out.mode == "RGB"
    assert abs(out.getpixel((0, 0))[0] - 128) <= 1  # mid-grey, not clipped to white


def test_float_image():
    arr = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    out = load_image(Image.fromarray(arr, mode="F"))
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((3, 3)) == (255, 255, 255)


def test_rgba_alpha_composited_on_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    img.putpixel((0, 0), (10, 20, 30, 255))
    out = load_image(png_bytes(img))
    assert out.getpixel((0, 0)) == (10, 20, 30) and out.getpixel((2, 2)) == (255, 255, 255)


def test_greyscale_alpha_and_bilevel():
    assert load_image(png_bytes(Image.new("LA", (3, 3), (0, 255)))).getpixel((0, 0)) == (0, 0, 0)
    assert load_image(png_bytes(Image.new("1", (3, 3), 1))).getpixel((0, 0)) == (255, 255, 255)


def test_animation_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    out = load_image(buf.getvalue())
    r, g, b = out.getpixel((4, 4))
    assert out.mode == "RGB" and r > 200 and g < 50 and b < 50


def test_exif_orientation_applied():
    img = Image.new("RGB", (40, 20), (255, 255, 255))
    img.paste((255, 0, 0), (0, 0, 10, 20))  # red stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    out = load_image(png_bytes(img, format="JPEG", exif=exif.tobytes(), quality=95))
    assert out.size == (20, 40)
    assert out.getpixel((10, 2))[1] < 80  # the red stripe is now at the top


def test_inputs_path_bytes_fileobj_and_pil(tmp_path):
    img = Image.new("RGB", (5, 7), (1, 2, 3))
    path = tmp_path / "ok.png"
    img.save(path)
    for source in (path, str(path), path.read_bytes(), open(path, "rb"), img):
        out = load_image(source)
        assert out.size == (5, 7) and out.getpixel((0, 0)) == (1, 2, 3)
