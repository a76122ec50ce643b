"""wanrt.images: image loading rules, official sizing, resizing, the frame mask and the conditioning video.

References are written here from the description (docs/model-reference.md §7), independently of the module.
"""

import io
import logging
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wanrt import images
from wanrt.images import (
    conditioning_chunks,
    conditioning_mask,
    conditioning_video,
    load_image,
    match_last_frame,
    resize_bicubic,
    size_from_max_area,
)

# Pillow is a dependency of wanrt (always there in CI); a bare GPU image may lack it: skip there, not error.
Image = pytest.importorskip("PIL.Image")

# ------------------------------------------------------------------------------------------------ references


def official_to_tensor(rgb: Image.Image) -> torch.Tensor:
    """The official ``TF.to_tensor(img).sub_(0.5).div_(0.5)`` on an RGB PIL image, written out."""
    assert rgb.mode == "RGB"
    t = torch.from_numpy(np.array(rgb, copy=True)).permute(2, 0, 1).contiguous()
    return t.to(torch.float32).div(255).sub_(0.5).div_(0.5)


def official_load(img: Image.Image) -> torch.Tensor:
    """What the official CLI does: ``Image.open(path).convert("RGB")`` then to_tensor * 2 - 1."""
    return official_to_tensor(img.convert("RGB"))


def rng_uint8(h, w, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, c), dtype=np.uint8)


def save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def assert_same(a: torch.Tensor, b: torch.Tensor):
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    assert torch.equal(a, b), f"max diff {(a - b).abs().max().item()}"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` with (almost) no pixel data: cheap to write, lazy to open."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b""))


# ------------------------------------------------------------------------------------------------ load_image: RGB


def test_uint8_rgb_all_values_match_official_bit_for_bit():
    arr = np.arange(256 * 3, dtype=np.int64).reshape(16, 48) % 256
    arr = np.stack([arr, arr[::-1], arr[:, ::-1]], axis=2).astype(np.uint8)  # [16, 48, 3]
    ref = official_to_tensor(Image.fromarray(arr))
    from_array = load_image(arr)
    from_pil = load_image(Image.fromarray(arr))
    assert_same(from_array, ref)
    assert_same(from_pil, ref)
    assert from_array.is_contiguous() and from_array.device.type == "cpu"
    assert from_array.shape == (3, 16, 48)
    # to_tensor * 2 - 1 is the same float32 arithmetic as the official sub_(0.5).div_(0.5)
    v = torch.arange(256, dtype=torch.float32).div(255)
    assert torch.equal(v * 2 - 1, v.sub(0.5).div(0.5))
    assert from_array.min() == -1 and from_array.max() == 1


def test_rgb_file_str_and_pathlike(tmp_path):
    arr = rng_uint8(20, 30)
    p = save(Image.fromarray(arr), tmp_path / "a.png")
    ref = load_image(arr)
    assert_same(load_image(p), ref)
    assert_same(load_image(str(p)), ref)


def test_file_is_closed_after_loading(tmp_path):
    p = save(Image.fromarray(rng_uint8(20, 30)), tmp_path / "a.png")
    load_image(p)
    fd_dir = Path("/proc/self/fd")
    if not fd_dir.exists():
        pytest.skip("needs /proc")
    open_targets = []
    for fd in os.listdir(fd_dir):
        try:
            open_targets.append(os.readlink(fd_dir / fd))
        except OSError:
            pass
    assert str(p) not in open_targets


# ------------------------------------------------------------------------------------------------ load_image: PIL modes


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK", "YCbCr", "HSV", "LAB", "RGBX"])
def test_opaque_modes_equal_official_convert_rgb(mode):
    if mode == "LAB":  # PIL has no RGB -> LAB conversion without ImageCms
        img = Image.frombytes("LAB", (23, 17), rng_uint8(17, 23).tobytes())
    else:
        img = Image.fromarray(rng_uint8(17, 23)).convert(mode)
    assert img.mode == mode
    assert_same(load_image(img), official_load(img))


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("1", "PNG"), ("RGB", "JPEG")])
def test_mode_files_equal_official(tmp_path, mode, fmt):
    img = Image.fromarray(rng_uint8(24, 40)).convert(mode)
    p = save(img, tmp_path / f"img_{mode}.{fmt.lower()}", format=fmt)
    with Image.open(p) as reopened:
        assert reopened.mode == mode
        ref = official_load(reopened)
    assert_same(load_image(p), ref)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "RGBa"])
def test_fully_opaque_alpha_is_dropped_like_official(tmp_path, mode):
    rgba = rng_uint8(18, 22, 4)
    rgba[:, :, 3] = 255
    img = Image.fromarray(rgba, mode="RGBA").convert(mode)
    assert img.mode == mode
    assert_same(load_image(img), official_load(img))
    if mode in ("RGBA", "LA"):
        p = save(img, tmp_path / f"opaque_{mode}.png")
        with Image.open(p) as reopened:
            assert reopened.mode == mode
            assert_same(load_image(p), official_load(reopened))


def test_partial_alpha_composited_over_white(tmp_path, caplog):
    rgba = rng_uint8(16, 20, 4)
    rgba[:, :, 3] = 255
    rgba[0, 0] = (10, 20, 30, 0)  # fully transparent: white
    rgba[1, 1] = (0, 0, 0, 128)  # half-transparent black over white
    rgba[2, 2] = (200, 100, 50, 255)  # opaque: as is
    p = save(Image.fromarray(rgba, mode="RGBA"), tmp_path / "alpha.png")
    with caplog.at_level(logging.INFO, logger="wanrt"):
        out = load_image(p)
    assert any("white" in r.getMessage() for r in caplog.records)
    assert torch.equal(out[:, 0, 0], torch.ones(3))
    half = (1 - 128 / 255) * 2 - 1
    assert torch.allclose(out[:, 1, 1], torch.full((3,), half), atol=1e-6)
    assert torch.allclose(out[:, 2, 2], torch.tensor([200, 100, 50]) / 255 * 2 - 1, atol=1e-6)
    # the same rule for the in-memory image and the ndarray
    assert torch.allclose(load_image(Image.fromarray(rgba, mode="RGBA")), out, atol=0)
    assert torch.allclose(load_image(rgba), out, atol=0)
    # and for LA
    la = Image.fromarray(rgba, mode="RGBA").convert("LA")
    assert torch.equal(load_image(la)[:, 0, 0], torch.ones(3))


def test_palette_with_transparency(tmp_path):
    arr = np.zeros((16, 16, 3), np.uint8)
    arr[:, :8] = (255, 0, 0)
    arr[:, 8:] = (0, 0, 255)
    pal = Image.fromarray(arr).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    blue_index = pal.getpixel((12, 0))
    used = save(pal, tmp_path / "p_used.png", transparency=blue_index)
    out = load_image(used)
    assert torch.equal(out[:, 0, 12], torch.ones(3))  # transparent blue -> white
    assert torch.allclose(out[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))  # opaque red kept
    unused = save(pal, tmp_path / "p_unused.png", transparency=3)  # index 3: no pixel uses it
    with Image.open(unused) as reopened, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PIL: "Palette images with Transparency ... RGBA"
        assert "transparency" in reopened.info
        assert_same(load_image(unused), official_load(reopened))


def test_la_premultiplied_mode():
    img = Image.fromarray(rng_uint8(16, 16, 2).astype(np.uint8)[:, :, 0]).convert("LA").convert("La")
    assert img.mode == "La"
    out = load_image(img)
    assert out.shape == (3, 16, 16) and torch.isfinite(out).all()


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    v = (np.arange(32 * 64, dtype=np.int64) * 32 + 31).reshape(32, 64)  # 31 .. 65535
    v[-1, -1] = 65535
    v[0, 0] = 0
    img16 = Image.fromarray(v.astype(np.uint16))
    p = save(img16, tmp_path / "gray16.png")
    with Image.open(p) as reopened:
        assert reopened.mode in ("I;16", "I")
        pil_clipped = official_load(reopened)
    out = load_image(p)
    expected8 = np.round(v / 257).astype(np.uint8)
    expected = torch.from_numpy(expected8).float().div(255).mul(2).sub(1)
    for c in range(3):
        assert torch.equal(out[c], expected)
    assert out.max() == 1 and out.min() == -1
    # PIL's own convert clips: almost everything would be white
    assert (pil_clipped == 1).float().mean() > 0.9
    assert (out == 1).float().mean() < 0.01


@pytest.mark.parametrize("mode,dtype", [("I;16", "<u2"), ("I;16B", ">u2"), ("I;16L", "<u2"), ("I;16N", "=u2")])
def test_16bit_modes(mode, dtype):
    v = np.linspace(0, 65535, 20 * 24).round().astype(np.int64).reshape(20, 24)
    img = Image.frombytes(mode, (24, 20), v.astype(dtype).tobytes())
    out = load_image(img)
    expected = torch.from_numpy(((v + 128) // 257).astype(np.uint8)).float().div(255).mul(2).sub(1)
    assert torch.equal(out[1], expected)


def test_mode_I_in_range_and_out_of_range():
    v = np.linspace(0, 65535, 16 * 16).round().astype(np.int32).reshape(16, 16)
    out = load_image(Image.fromarray(v))  # mode "I"
    expected = torch.from_numpy(np.round(v / 257).astype(np.uint8)).float().div(255).mul(2).sub(1)
    assert torch.equal(out[0], expected)
    for bad in (70000, -1):
        w = v.copy()
        w[3, 3] = bad
        img = Image.fromarray(w)
        assert img.mode == "I"
        with pytest.raises(ValueError, match=r"0\.\.65535"):
            load_image(img, name="last_image")


def test_float_mode_F_rejected():
    img = Image.fromarray(np.random.default_rng(0).random((16, 16), dtype=np.float32))
    assert img.mode == "F"
    with pytest.raises(ValueError, match="8/16-bit.*ndarray"):
        load_image(img)


def test_exif_orientation_applied(tmp_path):
    arr = np.zeros((32, 64, 3), np.uint8)  # stored landscape, HxW = 32x64
    arr[:8, :8] = 255  # a white top-left corner as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    p = save(Image.fromarray(arr), tmp_path / "rot.png", exif=exif)
    expected = load_image(np.ascontiguousarray(np.rot90(arr, k=-1)))  # clockwise
    out = load_image(p)
    assert out.shape == (3, 64, 32)
    assert_same(out, expected)
    assert out[0, 0, -1] == 1  # the corner moved to the top right
    with Image.open(p) as opened:  # an opened PIL image too
        assert_same(load_image(opened), expected)
    exif[0x0112] = 1
    p1 = save(Image.fromarray(arr), tmp_path / "norot.png", exif=exif)
    assert_same(load_image(p1), load_image(arr))


def test_animated_image_gives_first_frame(tmp_path):
    frames = [Image.fromarray(np.full((16, 16, 3), v, np.uint8)) for v in (0, 255)]
    p = tmp_path / "anim.png"
    frames[0].save(p, save_all=True, append_images=frames[1:])
    assert torch.equal(load_image(p), torch.full((3, 16, 16), -1.0))


# ------------------------------------------------------------------------------------------------ load_image: ndarrays


def test_gray_layouts_equal_pil_L():
    gray = rng_uint8(20, 18, 1)
    ref = official_load(Image.fromarray(gray[:, :, 0], mode="L"))
    assert_same(load_image(gray[:, :, 0]), ref)
    assert_same(load_image(gray), ref)


def test_rgba_ndarray_opaque_equals_rgb():
    rgba = rng_uint8(16, 24, 4)
    rgba[:, :, 3] = 255
    assert_same(load_image(rgba), load_image(np.ascontiguousarray(rgba[:, :, :3])))
    f = rgba.astype(np.float32) / 255
    assert torch.allclose(load_image(f), load_image(rgba), atol=1e-6)


def test_uint16_ndarray_full_precision():
    v = np.array([[0, 1, 257, 32768, 65534, 65535]] * 16, dtype=np.uint16).repeat(3, axis=1)  # [16, 18]
    out = load_image(v)
    expected = torch.from_numpy(v.astype(np.float32) / np.float32(65535)) * 2 - 1
    assert torch.equal(out[2], expected)
    assert out[0, 0, 3] > -1  # value 1 is not rounded away to 8 bits
    big_endian = v.astype(">u2")
    assert_same(load_image(big_endian), out)
    rgba = np.stack([v, v, v, np.full_like(v, 65535)], axis=2)
    assert_same(load_image(rgba), out)


def test_bool_and_float_dtypes():
    b = np.zeros((16, 16), bool)
    b[4:8] = True
    out = load_image(b)
    assert torch.equal(out[0], torch.from_numpy(b).float() * 2 - 1)
    x = np.random.default_rng(1).random((16, 20, 3))
    for dt in (np.float16, np.float32, np.float64):
        got = load_image(x.astype(dt))
        assert got.dtype == torch.float32 and got.shape == (3, 16, 20)
        assert torch.allclose(got, torch.from_numpy(x.astype(dt).astype(np.float32)).permute(2, 0, 1) * 2 - 1)


@pytest.mark.parametrize("bad,what", [(1.5, "1.5"), (-0.25, "-0.25"), (np.nan, "NaN"), (np.inf, "NaN/Inf")])
def test_float_out_of_range_rejected(bad, what):
    x = np.full((16, 16, 3), 0.5, np.float32)
    x[2, 3, 1] = bad
    with pytest.raises(ValueError, match=r"min .*max") as e:
        load_image(x, name="last_image")
    assert "last_image" in str(e.value) and what in str(e.value)


def test_non_contiguous_views():
    arr = rng_uint8(20, 40)
    view = arr[::-1, ::2]
    assert_same(load_image(view), load_image(np.ascontiguousarray(view)))


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 32, 32, 3), (32, 32, 2), (32, 32, 5), (32,)])
def test_bad_layouts(shape):
    with pytest.raises(ValueError, match="HxWx3 RGB"):
        load_image(np.zeros(shape, np.uint8))


def test_chw_layout_hint():
    with pytest.raises(ValueError, match=r"channels-first.*transpose\(1, 2, 0\)"):
        load_image(np.zeros((3, 64, 48), np.float32))


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint32, np.complex64, object])
def test_bad_dtypes(dtype):
    with pytest.raises(TypeError, match="HxWx3 RGB"):
        load_image(np.zeros((32, 32, 3), dtype=dtype))


@pytest.mark.parametrize("value", [torch.zeros(3, 32, 32), [[0, 1]], None, b"\x89PNG", 3])
def test_bad_types(value):
    with pytest.raises(TypeError, match="PIL.Image.Image.*ndarray.*path"):
        load_image(value, name="last_image")


# ------------------------------------------------------------------------------------------------ load_image: files


def test_missing_file(tmp_path):
    p = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(p)
    with pytest.raises(FileNotFoundError, match="last_image"):
        load_image(str(p), name="last_image")


def test_directory(tmp_path):
    with pytest.raises(ValueError, match="directory"):
        load_image(tmp_path)


@pytest.mark.parametrize("kind", ["text", "truncated", "empty"])
def test_unreadable_files(tmp_path, kind):
    p = tmp_path / f"{kind}.png"
    if kind == "text":
        p.write_text("not an image at all\n" * 10)
    elif kind == "empty":
        p.write_bytes(b"")
    else:
        buf = io.BytesIO()
        Image.fromarray(rng_uint8(64, 64)).save(buf, format="PNG")
        p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ValueError, match=f"{kind}.png.*not a readable image"):
        load_image(p)


# ------------------------------------------------------------------------------------------------ load_image: size


def test_too_small(tmp_path):
    with pytest.raises(ValueError, match="too small to condition a video"):
        load_image(np.zeros((15, 100, 3), np.uint8))
    with pytest.raises(ValueError, match="too small"):
        load_image(Image.new("RGB", (100, 8)))
    p = save(Image.new("RGB", (12, 40)), tmp_path / "small.png")
    with pytest.raises(ValueError, match="small.png.*too small"):
        load_image(p)
    assert load_image(np.zeros((16, 16, 3), np.uint8)).shape == (3, 16, 16)


def test_too_large_file_is_rejected_before_decoding(tmp_path):
    p = tmp_path / "huge.png"
    p.write_bytes(png_header_only(8193, 8193))  # 2**26 + 16385 pixels claimed, ~100 bytes on disk
    with pytest.raises(ValueError, match="huge.png.*downscale"):
        load_image(p)
    p2 = tmp_path / "bomb.png"
    p2.write_bytes(png_header_only(20000, 20000))  # beyond PIL's own decompression-bomb limit
    with pytest.raises(ValueError, match="bomb.png.*downscale"):
        load_image(p2)


def test_too_large_in_memory(monkeypatch):
    monkeypatch.setattr(images, "MAX_PIXELS", 32 * 32)
    assert load_image(np.zeros((32, 32, 3), np.uint8)).shape == (3, 32, 32)  # exactly the limit
    with pytest.raises(ValueError, match="downscale"):
        load_image(np.zeros((32, 33, 3), np.uint8))
    with pytest.raises(ValueError, match="downscale"):
        load_image(Image.new("RGB", (40, 40)))


# ------------------------------------------------------------------------------------------------ size_from_max_area


def official_size(h, w, max_area, vae_stride=8, patch=2):
    aspect_ratio = h / w
    lat_h = round(np.sqrt(max_area * aspect_ratio) // vae_stride // patch * patch)
    lat_w = round(np.sqrt(max_area / aspect_ratio) // vae_stride // patch * patch)
    return lat_h * vae_stride, lat_w * vae_stride


@pytest.mark.parametrize("h,w,area,expected", [
    (720, 1280, 720 * 1280, (720, 1280)),
    (1280, 720, 720 * 1280, (1280, 720)),
    # the official float arithmetic: sqrt(399360 * (480 / 832)) = 479.99999999999994, so 464 (not 480)
    (480, 832, 480 * 832, (464, 832)),
    (832, 480, 480 * 832, (832, 480)),
    (1000, 750, 480 * 832, (720, 544)),  # 4:3 portrait-ish
    (750, 1000, 480 * 832, (544, 720)),
    (1080, 1920, 720 * 1280, (720, 1280)),
    (3024, 4032, 720 * 1280, (816, 1104)),  # a 4:3 phone photo
    (1024, 1024, 480 * 832, (624, 624)),
])
def test_size_from_max_area_examples(h, w, area, expected):
    got = size_from_max_area(h, w, area)
    assert got == expected == official_size(h, w, area)
    assert all(type(v) is int and v % 16 == 0 for v in got)
    assert got[0] * got[1] <= area


def test_size_from_max_area_matches_official_sweep():
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(16, 5000, size=2))
        area = int(rng.choice([480 * 832, 720 * 1280, 1024 * 1024, 256 * 256]))
        try:
            got = size_from_max_area(h, w, area)
        except ValueError:
            assert 0 in official_size(h, w, area)
            continue
        assert got == official_size(h, w, area)


@pytest.mark.parametrize("area", [255, 0, -5, 1.5e6, True, "921600", None])
def test_size_from_max_area_bad_area(area):
    with pytest.raises(ValueError, match="max_area"):
        size_from_max_area(720, 1280, area)


def test_size_from_max_area_bad_sizes_and_extreme_aspect():
    with pytest.raises(ValueError, match="image_height"):
        size_from_max_area(0, 1280, 720 * 1280)
    with pytest.raises(ValueError, match="image_width"):
        size_from_max_area(720, 12.5, 720 * 1280)
    with pytest.raises(ValueError, match="height would be shorter than 16 px"):
        size_from_max_area(16, 100000, 480 * 832)
    with pytest.raises(ValueError, match="width would be shorter than 16 px"):
        size_from_max_area(100000, 16, 480 * 832)
    assert size_from_max_area(16, 16, 256) == (16, 16)


# ------------------------------------------------------------------------------------------------ resize_bicubic


def test_resize_bicubic_is_official_interpolate():
    img = torch.rand(3, 37, 53) * 2 - 1
    out = resize_bicubic(img, 48, 64)
    ref = F.interpolate(img[None], size=(48, 64), mode="bicubic", align_corners=False)[0]
    assert out.shape == (3, 48, 64) and out.dtype == torch.float32
    assert torch.equal(out, ref)


def test_resize_bicubic_no_clamp():
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 2.0 - 1  # [32, 32] in {-1, 1}
    img = checker.expand(3, 32, 32).contiguous()
    out = resize_bicubic(img, 80, 80)
    assert out.max() > 1 and out.min() < -1  # bicubic overshoot kept, as in the official code


def test_resize_bicubic_same_size_identity():
    img = torch.rand(3, 37, 53) * 2 - 1
    ref = F.interpolate(img[None], size=(37, 53), mode="bicubic", align_corners=False)[0]
    assert torch.equal(ref, img)  # the shortcut equals interpolate
    assert resize_bicubic(img, 37, 53) is img
    assert torch.equal(resize_bicubic(img.double(), 37, 53), img)


def test_resize_bicubic_validation():
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        resize_bicubic(torch.zeros(1, 3, 16, 16), 16, 16)
    with pytest.raises(ValueError, match="float"):
        resize_bicubic(torch.zeros(3, 16, 16, dtype=torch.uint8), 16, 16)
    with pytest.raises(ValueError, match="height"):
        resize_bicubic(torch.zeros(3, 16, 16), 0, 16)
    with pytest.raises(TypeError):
        resize_bicubic(np.zeros((3, 16, 16)), 16, 16)


# ------------------------------------------------------------------------------------------------ match_last_frame


def square_frame(h, w, side):
    """-1 background with a centered +1 square of ``side`` px."""
    x = torch.full((3, h, w), -1.0)
    top, left = (h - side) // 2, (w - side) // 2
    x[:, top:top + side, left:left + side] = 1
    return x


def test_match_last_frame_same_size_unchanged():
    first, last = torch.rand(3, 32, 48), torch.rand(3, 32, 48)
    assert match_last_frame(first, last) is last


@pytest.mark.parametrize("last_hw", [(40, 120), (120, 40), (16, 20), (64, 64)])
def test_match_last_frame_cover_and_center_crop(last_hw):
    first = torch.zeros(3, 32, 48)
    h2, w2 = last_hw
    side = min(h2, w2) // 2
    last = square_frame(h2, w2, side)
    out = match_last_frame(first, last)
    assert out.shape == (3, 32, 48) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    scale = max(32 / h2, 48 / w2)
    s = side * scale  # the square's side after the cover resize, centered in the crop
    assert torch.allclose(out[:, 16, 24], torch.ones(3), atol=0.05)  # the center is kept
    top, left = round(16 - s / 2), round(24 - s / 2)
    inner = out[:, top + 2:top + round(s) - 2, left + 2:left + round(s) - 2]
    assert inner.numel() > 0 and inner.mean() > 0.9
    if 16 - s / 2 > 3:  # background above the square
        assert out[:, 0, 24].max() < -0.9


def test_match_last_frame_same_aspect_is_a_plain_resize():
    first = torch.zeros(3, 32, 48)
    last = torch.rand(3, 64, 96) * 2 - 1
    ref = F.interpolate(last[None], size=(32, 48), mode="bicubic", align_corners=False, antialias=True)[0]
    assert torch.allclose(match_last_frame(first, last), ref.clamp(-1, 1), atol=1e-6)


def test_match_last_frame_validation():
    with pytest.raises(ValueError, match="last"):
        match_last_frame(torch.zeros(3, 16, 16), torch.zeros(16, 16))
    with pytest.raises(TypeError, match="first"):
        match_last_frame(None, torch.zeros(3, 16, 16))


# ------------------------------------------------------------------------------------------------ conditioning_mask


def mask_from_description(num_frames, lat_h, lat_w, last_frame):
    """Channel c of latent frame t is pixel frame 4t + c - 3 (frame 0 for t = 0); given frames are 1."""
    t_lat = (num_frames - 1) // 4 + 1
    m = torch.zeros(4, t_lat, lat_h, lat_w)
    for t in range(t_lat):
        for c in range(4):
            frame = 0 if t == 0 else 4 * t + c - 3
            if frame == 0 or (last_frame and frame == num_frames - 1):
                m[c, t] = 1
    return m


def official_mask(lat_h, lat_w, last_frame, F_=81):
    """The official image2video.py / first_last_frame2video.py code (§7.5), as written there for 81 frames."""
    msk = torch.ones(1, F_, lat_h, lat_w)
    if last_frame:
        msk[:, 1:-1] = 0
    else:
        msk[:, 1:] = 0
    msk = torch.concat([torch.repeat_interleave(msk[:, 0:1], repeats=4, dim=1), msk[:, 1:]], dim=1)
    msk = msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w)
    return msk.transpose(1, 2)[0]


@pytest.mark.parametrize("last_frame", [False, True])
def test_mask_equals_official_81(last_frame):
    got = conditioning_mask(81, 6, 10, last_frame=last_frame)
    assert got.shape == (4, 21, 6, 10) and got.dtype == torch.float32 and got.is_contiguous()
    assert torch.equal(got, official_mask(6, 10, last_frame))
    assert torch.equal(got, mask_from_description(81, 6, 10, last_frame))


@pytest.mark.parametrize("num_frames,last_frame", [(1, False), (5, False), (9, False), (17, False),
                                                   (5, True), (9, True), (13, True)])
def test_mask_any_4k_plus_1(num_frames, last_frame):
    got = conditioning_mask(num_frames, 3, 5, last_frame=last_frame)
    assert got.shape == (4, (num_frames - 1) // 4 + 1, 3, 5)
    assert torch.equal(got, mask_from_description(num_frames, 3, 5, last_frame))
    assert torch.equal(got, official_mask(3, 5, last_frame, F_=num_frames))
    assert torch.equal(got[:, 0], torch.ones(4, 3, 5))  # frame 0 in all 4 channels
    if last_frame:
        assert torch.equal(got[:, -1, 0, 0], torch.tensor([0.0, 0, 0, 1]))


def test_mask_validation():
    for n in (0, 2, 80, 4.0, True, None):
        with pytest.raises(ValueError, match="4k\\+1"):
            conditioning_mask(n, 4, 4, last_frame=False)
    with pytest.raises(ValueError, match="distinct first and last"):
        conditioning_mask(1, 4, 4, last_frame=True)
    with pytest.raises(ValueError, match="lat_w"):
        conditioning_mask(5, 4, 0, last_frame=False)


# ------------------------------------------------------------------------------------------------ conditioning video


def official_video(first, last, num_frames):
    _, h, w = first.shape
    parts = [first[:, None]]
    if last is None:
        parts.append(torch.zeros(3, num_frames - 1, h, w))
    else:
        parts += [torch.zeros(3, num_frames - 2, h, w), last[:, None]]
    return torch.cat(parts, dim=1)[None]  # [1, 3, F, h, w]


@pytest.mark.parametrize("num_frames,with_last", [(1, False), (5, False), (17, False), (81, False),
                                                  (5, True), (9, True), (81, True)])
def test_chunks_and_video_equal_official(num_frames, with_last):
    first = torch.rand(3, 8, 12) * 2 - 1
    last = torch.rand(3, 8, 12) * 2 - 1 if with_last else None
    chunks = list(conditioning_chunks(first, last, num_frames))
    assert len(chunks) == 1 + (num_frames - 1) // 4
    assert chunks[0].shape == (1, 3, 1, 8, 12)
    assert all(c.shape == (1, 3, 4, 8, 12) for c in chunks[1:])
    ref = official_video(first, last, num_frames)
    assert torch.equal(torch.cat(chunks, dim=2), ref)
    assert torch.equal(conditioning_video(first, last, num_frames), ref)


def test_chunks_are_lazy_and_fresh():
    first = torch.rand(3, 8, 8)
    gen = conditioning_chunks(first, None, 81)
    assert not isinstance(gen, (list, tuple))
    next(gen)
    a, b = next(gen), next(gen)
    a.fill_(5)
    assert torch.equal(b, torch.zeros_like(b))


def test_chunks_validate_at_call():
    first = torch.rand(3, 8, 8)
    with pytest.raises(ValueError, match="4k\\+1"):
        conditioning_chunks(first, None, 8)  # raised without iterating
    with pytest.raises(ValueError, match="distinct"):
        conditioning_chunks(first, first, 1)
    with pytest.raises(ValueError, match="match_last_frame"):
        conditioning_chunks(first, torch.rand(3, 8, 16), 5)
    with pytest.raises(ValueError, match="match first"):
        conditioning_video(first, first.double(), 5)
