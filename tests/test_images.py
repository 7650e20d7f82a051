"""ldm.data.images: every mode to the right RGB, EXIF orientation, one alpha policy, header-only size limit,
strict captions; per-reason skip counts in the loader; the folder builder and the loader agree pixel for pixel."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from ldm.data.folder import build_folder
from ldm.data.images import DecodeError, decode_caption, decode_rgb, open_image, parse_background
from ldm.data.shards import encode_sample, list_shards, write_shard
from ldm.data.webdata import SKIP_REASONS, ShardDataset, WebDataModule, decode_image

BLUE = (0, 0, 255)


def encode(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def rgb(data: bytes, **kw) -> np.ndarray:
    return np.asarray(decode_rgb(data, **kw))


def reason(data: bytes, **kw) -> str:
    with pytest.raises(DecodeError) as e:
        decode_rgb(data, **kw)
    return e.value.reason


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` RGB pixels but carries only a few bytes of image data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def strip_adobe_marker(jpeg: bytes) -> bytes:
    """Remove the APP14 "Adobe" segment of a JPEG (the marker that says CMYK samples are inverted)."""
    pos = 2
    while pos < len(jpeg):
        marker, length = jpeg[pos + 1], struct.unpack(">H", jpeg[pos + 2:pos + 4])[0]
        if marker == 0xEE:
            return jpeg[:pos] + jpeg[pos + 2 + length:]
        if marker == 0xDA:
            break
        pos += 2 + length
    raise AssertionError("no Adobe APP14 segment")


# ---- modes ------------------------------------------------------------------------------------------
def test_16_bit_grey_keeps_its_values_instead_of_turning_white():
    values = np.array([[0, 100 * 257, 32896, 65535, 300]], np.uint16)  # 32896 = 128 * 257
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    expected = np.array([0, 100, 128, 255, 1], np.uint8)  # round(v / 257)
    for data in (encode(image), encode(image, "TIFF"), encode(image.convert("I"), "TIFF")):
        out = rgb(data)
        assert out.shape == (1, 5, 3)
        np.testing.assert_array_equal(out[0, :, 0], expected)
        assert (out == out[..., :1]).all()  # grey stays grey
    big_endian = Image.frombytes("I;16B", (5, 1), values.astype(">u2").tobytes())
    np.testing.assert_array_equal(rgb(encode(big_endian, "TIFF"))[0, :, 1], expected)
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0, -1.0]], np.float32))
    np.testing.assert_array_equal(rgb(encode(floats, "TIFF"))[0, :, 2], [0, 128, 255, 255, 0])  # 0..1, clipped


def test_exif_orientation_puts_pixels_where_the_viewer_sees_them():
    stored = np.zeros((32, 64, 3), np.uint8)  # 64 wide, 32 high, blue; a red block in the stored top-left corner
    stored[..., 2] = 255
    stored[:16, :16] = (255, 0, 0)
    exif = Image.Exif()
    # 6: the viewer rotates 90° clockwise (top-left → top-right); 8: counter-clockwise (→ bottom-left)
    for value, (rows, cols) in ((6, (slice(0, 16), slice(16, 32))), (8, (slice(48, 64), slice(0, 16)))):
        exif[0x0112] = value
        for fmt, tol in (("PNG", 0), ("JPEG", 12)):
            out = rgb(encode(Image.fromarray(stored), fmt, exif=exif.tobytes(), quality=95)).astype(int)
            assert out.shape == (64, 32, 3), (value, fmt)
            inner = (slice(rows.start + 3, rows.stop - 3), slice(cols.start + 3, cols.stop - 3))  # JPEG blurs edges
            assert np.abs(out[inner] - (255, 0, 0)).max() <= tol, (value, fmt)
            elsewhere = (slice(64 - rows.stop + 3, 64 - rows.start - 3), slice(cols.start + 3, cols.stop - 3))
            assert np.abs(out[elsewhere] - BLUE).max() <= tol, (value, fmt)
            np.testing.assert_array_equal(out, np.asarray(ImageOps.exif_transpose(
                Image.open(io.BytesIO(encode(Image.fromarray(stored), fmt, exif=exif.tobytes(), quality=95))))))
    exif[0x0112] = 1
    assert rgb(encode(Image.fromarray(stored), exif=exif.tobytes())).shape == (32, 64, 3)


def test_alpha_is_composited_on_the_chosen_background_exactly():
    rgba = np.array([[[200, 100, 0, 128], [10, 20, 30, 0], [10, 20, 30, 255]]], np.uint8)
    out = rgb(encode(Image.fromarray(rgba, "RGBA")), background=BLUE)
    # C = round(a F + (1 - a) B): 200·128/255 = 100.4, 100·128/255 = 50.2, 255·127/255 = 127
    np.testing.assert_array_equal(out[0], [[100, 50, 127], [0, 0, 255], [10, 20, 30]])
    la = np.array([[[60, 64], [60, 255]]], np.uint8)
    out = rgb(encode(Image.fromarray(la, "LA")), background=BLUE)
    np.testing.assert_array_equal(out[0], [[15, 15, 206], [60, 60, 60]])  # 60·64/255 = 15.1; + 255·191/255
    assert rgb(encode(Image.fromarray(rgba, "RGBA")))[0, 1].tolist() == [255, 255, 255]  # default: white


def test_palette_with_and_without_transparency():
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    np.testing.assert_array_equal(rgb(encode(palette))[0], [[255, 0, 0], [0, 255, 0]])
    np.testing.assert_array_equal(rgb(encode(palette, transparency=1), background=BLUE)[0], [[255, 0, 0], BLUE])
    # per-entry alpha (tRNS with several values): entry 0 half transparent
    out = rgb(encode(palette, transparency=bytes([128, 255])), background=BLUE)[0]
    np.testing.assert_array_equal(out, [[128, 0, 127], [0, 255, 0]])
    grey_key = Image.fromarray(np.array([[7, 9]], np.uint8), "L")
    np.testing.assert_array_equal(rgb(encode(grey_key, transparency=9), background=BLUE)[0], [[7, 7, 7], BLUE])


def test_cmyk_jpeg_with_and_without_the_adobe_marker():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red
    cmyk.paste((0, 0, 0, 128), (0, 8, 16, 16))  # bottom half: 50 % black
    adobe = encode(cmyk, "JPEG", quality=95)
    assert "adobe" in Image.open(io.BytesIO(adobe)).info  # Pillow writes Adobe-inverted samples
    expected = np.zeros((16, 16, 3), int)
    expected[:8] = (255, 0, 0)
    expected[8:] = 127  # (255 - 128)
    assert np.abs(rgb(adobe).astype(int) - expected).max() <= 6
    # a CMYK JPEG without the marker stores plain (not inverted) samples
    from PIL import ImageChops
    plain = strip_adobe_marker(encode(ImageChops.invert(cmyk), "JPEG", quality=95))
    assert "adobe" not in Image.open(io.BytesIO(plain)).info
    assert np.abs(rgb(plain).astype(int) - expected).max() <= 6


# ---- refusals ---------------------------------------------------------------------------------------
def test_broken_files_are_refused_with_a_reason():
    good = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)))
    assert reason(good[: len(good) // 2]) == "corrupt_image"
    jpeg = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    assert reason(jpeg[: len(jpeg) - 200]) == "corrupt_image"
    assert reason(b"") == "empty_file"
    assert reason(b"certainly not an image") == "unknown_format"


def test_too_many_pixels_is_refused_from_the_header_without_decoding():
    # 9000 x 9000 = 81 MP: over the default 64 MP limit; its data is a few bytes, so a decode would fail
    # as corrupt_image, and 100 000² would need 30 GB: the refusal can only come from the header
    assert reason(png_header_only(9000, 9000)) == "too_many_pixels"
    assert reason(png_header_only(100_000, 100_000)) == "too_many_pixels"
    assert reason(png_header_only(9000, 9000), max_pixels=None) == "corrupt_image"  # no limit: it is decoded
    assert reason(png_header_only(40, 40), max_pixels=1000) == "too_many_pixels"
    # a JPEG that will be shrunk anyway decodes at 1/4 scale (500 x 250) and fits a limit its full size breaks
    big = encode(Image.new("RGB", (2000, 1000), (9, 99, 199)), "JPEG")
    assert reason(big, max_pixels=600_000) == "too_many_pixels"
    assert open_image(big, 600_000, min_side=200).size == (500, 250)
    assert decode_image(big, 200, max_pixels=600_000).shape == (200, 200, 3)


def test_captions_are_strict_utf8():
    assert decode_caption("  un café\n".encode()) == "un café"
    assert decode_caption(b"\xef\xbb\xbfbom") == "bom"
    with pytest.raises(DecodeError) as e:
        decode_caption(b"caf\xe9")  # Latin-1, not UTF-8
    assert e.value.reason == "invalid_utf8" and "byte 3" in str(e.value)


def test_background_parsing():
    assert parse_background("white") == (255, 255, 255)
    assert parse_background("#336699") == (0x33, 0x66, 0x99)
    assert parse_background([1, 2, 3]) == (1, 2, 3)
    for bad in ("nocolour", [1, 2], [0, 0, 256]):
        with pytest.raises(ValueError, match="background"):
            parse_background(bad)
    with pytest.raises(ValueError, match="--data.background"):
        WebDataModule("x", background="nocolour")


# ---- the loader counts each reason ----------------------------------------------------------------
def test_loader_counts_every_skip_reason_separately(tmp_path):
    ok = encode(Image.new("RGB", (32, 32), (5, 6, 7)))
    samples = [
        ("good0", encode_sample(ok, "fine", {})),
        ("trunc", encode_sample(ok[:60], "truncated", {})),
        ("zero", encode_sample(b"", "zero bytes", {})),
        ("huge", encode_sample(png_header_only(9000, 9000), "too big", {})),
        ("latin1", {"png": ok, "txt": "café".encode("latin-1")}),
        ("nocap", {"png": ok}),
        ("badjson", {"png": ok, "txt": b"x", "json": b"{"}),
        ("noimage", {"txt": b"caption only"}),
        ("good1", encode_sample(ok, "also fine", {})),
    ]
    write_shard(tmp_path / "train" / "a.tar", samples)
    dataset = ShardDataset(list_shards(tmp_path, "train"), 32, batch_size=8)
    with pytest.warns(UserWarning):
        batches = list(dataset)
    assert [k for b in batches for k in b["key"]] == ["good0", "good1"]
    reasons = {}
    for b in batches:
        for k, n in b["skip_reasons"].items():
            reasons[k] = reasons.get(k, 0) + n
    assert reasons == {"corrupt_image": 1, "empty_file": 1, "too_many_pixels": 1, "invalid_utf8": 1,
                       "missing_caption": 1, "bad_json": 1, "no_image": 1}
    assert sum(int(b["skipped"]) for b in batches) == 7 and set(reasons) <= set(SKIP_REASONS)


# ---- builder and loader agree --------------------------------------------------------------------
def awkward_images() -> dict[str, bytes]:
    """One file per mode that needs care, all with content that survives resizing checks."""
    g = np.random.default_rng(3)
    rgba = g.integers(0, 256, (24, 40, 4), dtype=np.uint8)
    rgba[::5, ::3, 3] = 0  # some fully transparent pixels
    palette = Image.fromarray(g.integers(0, 256, (30, 20, 3), dtype=np.uint8)).quantize(16)
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "rgba": encode(Image.fromarray(rgba, "RGBA")),
        "la": encode(Image.fromarray(rgba[..., [0, 3]], "LA")),
        "palette": encode(palette, transparency=3),
        "grey16": encode(Image.fromarray((g.integers(0, 65536, (20, 28))).astype(np.uint16))),
        "rotated": encode(Image.fromarray(rgba[..., :3]), exif=exif.tobytes()),
        "cmyk": encode(Image.fromarray(rgba, "RGBA").convert("CMYK"), "TIFF"),
    }


@pytest.mark.parametrize("size", [16, None])
def test_folder_builder_and_loader_give_identical_pixels(tmp_path, size):
    images = awkward_images()
    src = tmp_path / "src"
    src.mkdir()
    for name, data in images.items():
        (src / f"{name}.{'tif' if name == 'cmyk' else 'png'}").write_bytes(data)
        (src / f"{name}.txt").write_text(name)
    background = (0x33, 0x66, 0x99)
    built = tmp_path / f"built-{size}"
    info = build_folder(src, built, size=size, val_fraction=0.0, processes=1, background="#336699")
    assert info["counts"]["train"] == len(images) and info["background"] == list(background)
    # the same bytes through the loader directly (a shard of the original files)
    raw = tmp_path / "raw"
    write_shard(raw / "train" / "r.tar", [(n, {"png": d, "txt": n.encode()}) for n, d in sorted(images.items())])

    def load(root: Path) -> dict[str, np.ndarray]:
        dm = WebDataModule(str(root), resolution=16, batch_size=64, num_workers=0, shuffle_buffer=0,
                           val_split=None, background=list(background))
        batch = next(iter(dm.train_dataloader()))
        captions = batch["caption"]
        return {c: ((batch["image"][i].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
                for i, c in enumerate(captions)}

    direct, via_builder = load(raw), load(built)
    assert sorted(direct) == sorted(via_builder) == sorted(images)
    for name in images:
        np.testing.assert_array_equal(direct[name], via_builder[name], err_msg=name)
        np.testing.assert_array_equal(direct[name], decode_image(images[name], 16, background=background))
    # the alpha really met the background: a fully transparent RGBA pixel is exactly it
    rgba = np.asarray(Image.open(io.BytesIO(images["rgba"])))
    full = decode_rgb(images["rgba"], background=background)
    y, x = np.argwhere(rgba[..., 3] == 0)[0]
    assert tuple(np.asarray(full)[y, x]) == background
    if size is None:
        meta = {json.loads(s["json"])["source_path"]: json.loads(s["json"]) for s in _samples(built)}
        assert (meta["rotated.png"]["width"], meta["rotated.png"]["height"]) == (24, 40)  # upright size


def _samples(root: Path):
    from ldm.data.shards import read_shard

    return [files for url in list_shards(root, "train") for _, files in read_shard(url)]


def test_folder_builder_reports_decoding_skips_by_reason(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.png").write_bytes(encode(Image.new("RGB", (8, 8))))
    (src / "ok.txt").write_text("ok")
    (src / "zero.png").write_bytes(b"")
    (src / "zero.txt").write_text("zero")
    (src / "huge.png").write_bytes(png_header_only(9000, 9000))
    (src / "huge.txt").write_text("huge")
    (src / "latin.png").write_bytes(encode(Image.new("RGB", (8, 8), (1, 1, 1))))
    (src / "latin.txt").write_bytes("café".encode("latin-1"))
    info = build_folder(src, tmp_path / "out", val_fraction=0.0, processes=1)
    assert info["skipped"] == {"empty_file": 1, "too_many_pixels": 1, "invalid_utf8": 1}
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["skipped"]["invalid_utf8"] == ["latin.txt".replace(".txt", ".png")]
    assert "UTF-8" in report["reasons"]["invalid_utf8"]
