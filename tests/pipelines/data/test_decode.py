"""Decoding: JPEG and PNG in every colour mode to RGB uint8; broken files are errors naming the file."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipelines.data.decode import ImageDecodeError, decode_image, fast_decoder_available


def _smooth(h=48, w=64, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("decoder", ["auto", "pillow"])
def test_jpeg_rgb_gray_cmyk(decoder):
    rgb = _smooth()
    out = decode_image(_encode(Image.fromarray(rgb), "JPEG", quality=95), decoder=decoder)
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert np.abs(out.astype(int) - rgb).mean() < 3
    gray = decode_image(_encode(Image.fromarray(rgb[..., 0]), "JPEG", quality=95), decoder=decoder)
    assert gray.shape == (48, 64, 3) and (gray[..., 0] == gray[..., 2]).all()
    cmyk = decode_image(_encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95), decoder=decoder)
    assert cmyk.shape == (48, 64, 3) and np.abs(cmyk.astype(int) - rgb).mean() < 6


def test_fast_decoder_matches_pillow():
    if not fast_decoder_available():
        pytest.skip("simplejpeg not installed")
    data = _encode(Image.fromarray(_smooth(seed=1)), "JPEG", quality=90)
    a, b = decode_image(data, decoder="auto"), decode_image(data, decoder="pillow")
    assert np.abs(a.astype(int) - b).max() <= 2


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "PA", "I;16", "1"])
def test_png_modes(mode):
    rgb = _smooth()
    if mode == "I;16":
        img = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)  # Pillow picks I;16
    elif mode in ("P", "PA"):
        img = Image.fromarray(rgb).quantize(16)
        if mode == "PA":
            img.info["transparency"] = 0
    else:
        img = Image.fromarray(rgb).convert(mode)
    out = decode_image(_encode(img, "PNG"), name="x.png")
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    if mode in ("RGB", "RGBA"):
        assert (out == rgb).all()  # lossless; alpha dropped, colour kept
    if mode == "I;16":
        assert np.abs(out[..., 0].astype(int) - rgb[..., 0]).max() <= 1


@pytest.mark.parametrize("decoder", ["auto", "pillow"])
def test_broken_files_name_the_file(decoder):
    data = _encode(Image.fromarray(_smooth()), "JPEG", quality=90)
    for bad in (data[: len(data) // 2], b"\xff\xd8\xff" + b"\x00" * 100, b"not an image at all", b""):
        with pytest.raises(ImageDecodeError, match="broken.jpg"):
            decode_image(bad, name="broken.jpg", decoder=decoder)


def _corrupt_middle(data: bytes, n: int = 200) -> bytes:
    m = len(data) // 2
    return data[: m - n // 2] + b"\x00" * n + data[m + n // 2 :]


def test_jpeg_corrupt_in_the_middle_is_an_error():
    if not fast_decoder_available():
        pytest.skip("simplejpeg not installed; Pillow alone decodes such files without an error")
    img = Image.fromarray(_smooth()).resize((256, 192), Image.BILINEAR)
    data = _encode(img, "JPEG", quality=90)
    with pytest.raises(ImageDecodeError, match=r"broken\.jpg: corrupt JPEG \(Corrupt JPEG data"):
        decode_image(_corrupt_middle(data), name="broken.jpg")
    # Pillow drops libjpeg's warnings: the same file decodes with a damaged region and no error.
    assert decode_image(_corrupt_middle(data), decoder="pillow").shape == (192, 256, 3)
    # A damaged scan may also end early, before the end marker, or hit a byte that reads as a marker.
    with pytest.raises(ImageDecodeError, match=r"broken\.jpg: corrupt JPEG \(Corrupt JPEG data: \d+ extraneous"):
        decode_image(data[:-2] + b"\x00" * 8 + data[-2:], name="broken.jpg")
    m = len(data) // 2
    with pytest.raises(ImageDecodeError, match=r"broken\.jpg: corrupt JPEG \(Unsupported marker"):
        decode_image(data[:m] + b"\xff" * 50 + data[m + 50 :], name="broken.jpg")


def _with_orientation(pixels: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())


def test_exif_orientation_is_read_and_never_applied():
    from pipelines.data.decode import exif_orientation

    rgb = _smooth(48, 64)
    tagged = _with_orientation(rgb, 6)  # "rotate 90 degrees to display"
    assert exif_orientation(tagged) == 6 and exif_orientation(_encode(Image.fromarray(rgb), "JPEG")) == 1
    assert exif_orientation(b"not an image") == 1
    assert decode_image(tagged).shape == (48, 64, 3)  # the stored pixels, as COCO's sizes describe them


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_turns_pixels_as_pillow_shows_them(orientation):
    from PIL import ImageOps

    from pipelines.data.decode import apply_exif_orientation

    rgb = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    with Image.open(io.BytesIO(_encode(Image.fromarray(rgb), "PNG", exif=exif.tobytes()))) as img:
        shown = np.asarray(ImageOps.exif_transpose(img))
    np.testing.assert_array_equal(apply_exif_orientation(rgb, orientation), shown)


def test_size_mismatch_names_the_exif_tag():
    from pipelines.data.categories import CategoryMap
    from pipelines.data.coco import BadInputError
    from pipelines.data.data_config import DataConfig
    from pipelines.data.sample import make_sample

    tagged = _with_orientation(_smooth(48, 64), 6)
    # Annotated on the rotated view: 64 high, 48 wide.
    row = {"file_name": "phone.jpg", "image_id": 5, "height": 64, "width": 48, "boxes": [], "category_id": []}
    row.update(iscrowd=[], ann_id=[])
    cats = CategoryMap.from_categories([{"id": 1, "name": "a"}], "raw")
    with pytest.raises(BadInputError, match=r"phone.jpg \(image 5\): decoded size 48x64 .* EXIF orientation tag is 6"):
        make_sample(tagged, row, categories=cats, cfg=DataConfig(), augment=False, keep_crowd=True, epoch=0)
