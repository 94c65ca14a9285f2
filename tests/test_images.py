"""lingshu_fast.data.images: load_image, smart_resize, resize, preprocess == transformers' processor.

Parity is exact (torch.equal): our CPU side runs the same PIL bicubic resize on the same uint8 RGB
image, and the packing reference reproduces transformers' float64 rescale / float32 normalise (see
tests/test_image_pack.py). Budgets are kept small so that the whole file runs in seconds.
"""
import math
import shutil

import numpy as np
import PIL.Image
import pytest
import torch

from lingshu_fast.data.images import ImageError, load_image, preprocess, resize_image, smart_resize

SMALL_MIN, SMALL_MAX = 28 * 28 * 4, 28 * 28 * 48  # budgets that keep the test images small


def _processor(min_pixels, max_pixels):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


def _assert_same(images, min_pixels=SMALL_MIN, max_pixels=SMALL_MAX, ours_input=None):
    expected = _processor(min_pixels, max_pixels)(images, return_tensors="pt")
    pixel_values, grid_thw = preprocess(ours_input if ours_input is not None else images,
                                        min_pixels=min_pixels, max_pixels=max_pixels)
    assert torch.equal(grid_thw, expected["image_grid_thw"])
    assert pixel_values.shape == expected["pixel_values"].shape
    assert torch.equal(pixel_values, expected["pixel_values"])


def _rgb(h, w, seed=0, channels=3):
    rng = np.random.default_rng(seed)
    # smooth gradient + noise: bicubic overshoot and clipping both get exercised
    base = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, channels))
    return np.clip(base + rng.normal(0, 60, (h, w, channels)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    "size",
    [(37, 53), (101, 29), (13, 200), (5, 7), (240, 320), (29, 1000), (300, 31)],
    ids=lambda s: f"{s[0]}x{s[1]}",
)
def test_preprocess_equals_transformers_rgb(size):
    """Odd sizes: up-scaled tiny images (min_pixels branch), down-scaled large ones (max_pixels
    branch), extreme aspect ratios; bicubic resize, normalisation and patch order all pinned."""
    _assert_same([_rgb(*size, seed=sum(size))])


def test_preprocess_equals_transformers_batch_and_extremes():
    """A batch of mixed sizes in one call; then the min_pixels == max_pixels extreme and the
    transformers default budget on a mid-size image."""
    images = [_rgb(60, 45, 1), _rgb(17, 90, 2), _rgb(128, 128, 3)]
    _assert_same(images)
    _assert_same([_rgb(70, 50, 4)], min_pixels=28 * 28 * 6, max_pixels=28 * 28 * 6)
    _assert_same([_rgb(150, 120, 5)], min_pixels=56 * 56, max_pixels=28 * 28 * 1280)


def test_preprocess_equals_transformers_grey_and_alpha_arrays():
    """Grey HxW and HxWx1 arrays are repeated to RGB; RGBA arrays are blended onto white with
    transformers' rounding."""
    grey = _rgb(45, 61, 6, channels=1)
    _assert_same([grey])
    # transformers refuses a bare HxW array in a list; ours takes it and equals the HxWx1 result
    _assert_same([grey], ours_input=[grey[:, :, 0]])
    rgba = _rgb(33, 47, 7, channels=4)
    _assert_same([rgba])


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "1", "CMYK"])
def test_preprocess_equals_transformers_pil_modes(mode):
    """PIL images in other modes go through PIL's own convert (alpha composited onto white) exactly as
    transformers does; includes a palette image with a transparency key."""
    rgb = PIL.Image.fromarray(_rgb(40, 52, 8))
    if mode == "P":
        image = rgb.convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=16)
        image.info["transparency"] = 3
    elif mode == "LA":
        image = PIL.Image.merge("LA", [rgb.convert("L"), PIL.Image.fromarray(_rgb(40, 52, 9, 1)[:, :, 0])])
    elif mode == "RGBA":
        image = PIL.Image.fromarray(_rgb(40, 52, 10, channels=4), mode="RGBA")
    else:
        image = rgb.convert(mode)
    _assert_same([image])


def test_preprocess_equals_transformers_files(tmp_path):
    """PNG and JPEG files by path: ours reads the file, transformers gets PIL.Image.open of it."""
    png, jpg = tmp_path / "a.png", tmp_path / "b.JPG"
    PIL.Image.fromarray(_rgb(77, 41, 11)).save(png)
    PIL.Image.fromarray(_rgb(50, 90, 12)).save(jpg, quality=85)
    _assert_same([PIL.Image.open(png), PIL.Image.open(jpg)], ours_input=[str(png), jpg])


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_preprocess_dicom_equals_transformers_on_rendered_uint8(name):
    """DICOM CT/MR from pydicom's test files: rendered to 8-bit RGB by read_dicom, then both
    pipelines get that same uint8 image (transformers cannot read DICOM itself)."""
    get_testdata_file = pytest.importorskip("pydicom.data", reason="pydicom is not installed").get_testdata_file

    from lingshu_fast.data.dicom import read_dicom

    path = get_testdata_file(name)
    _assert_same([read_dicom(path)], ours_input=[path])


def test_smart_resize_equals_transformers():
    """Same (h, w) as transformers' smart_resize over a grid of sizes and budgets (both branches)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    budgets = [(56 * 56, 28 * 28 * 1280), (28 * 28 * 4, 28 * 28 * 16), (3136, 3136), (100, 200_000)]
    sides = [1, 3, 13, 14, 27, 28, 29, 41, 56, 99, 224, 500, 1023, 4000]
    for min_pixels, max_pixels in budgets:
        for h in sides:
            for w in sides:
                if max(h, w) / min(h, w) > 200:
                    continue
                expected = hf_smart_resize(h, w, 28, min_pixels, max_pixels)
                assert smart_resize(h, w, 28, min_pixels, max_pixels) == expected, (h, w, min_pixels, max_pixels)


def test_smart_resize_errors_are_image_errors():
    """transformers raises ValueError (aspect > 200) or ZeroDivisionError (empty image): ours ImageError."""
    with pytest.raises(ImageError, match="aspect ratio"):
        smart_resize(10, 2010)
    with pytest.raises(ImageError, match="empty"):
        smart_resize(0, 28)
    with pytest.raises(ImageError, match="min_pixels"):
        smart_resize(28, 28, min_pixels=5000, max_pixels=4000)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    assert smart_resize(10, 2000) == hf_smart_resize(10, 2000) == (28, 812)  # aspect exactly 200 is allowed


def test_resize_image_budget_and_multiples():
    """The resized image obeys the budget, is a multiple of 28 and keeps the aspect ratio roughly."""
    out = resize_image(_rgb(500, 300, 13), min_pixels=SMALL_MIN, max_pixels=SMALL_MAX)
    h, w = out.shape[:2]
    assert out.dtype == np.uint8 and out.shape[2] == 3
    assert h % 28 == 0 and w % 28 == 0 and SMALL_MIN <= h * w <= SMALL_MAX
    assert math.isclose(h / w, 500 / 300, rel_tol=0.25)


def test_sixteen_bit_grey_is_stretched_not_clipped(tmp_path):
    """Documented deviation: a 16-bit PNG (PIL mode I;16) and uint16 arrays are stretched min-max to
    8 bits. PIL's convert("RGB"), which transformers uses, clips at 255: the 12-bit ramp below would
    come out >= 93% white there."""
    ramp = (np.arange(48 * 64).reshape(48, 64) + 100).astype(np.uint16)  # 100..3171, a 12-bit range
    path = tmp_path / "xray16.png"
    PIL.Image.fromarray(ramp).save(path)
    assert PIL.Image.open(path).mode.startswith("I;16")
    clipped = np.asarray(PIL.Image.open(path).convert("RGB"))
    assert (clipped == 255).mean() > 0.9  # the failure mode we avoid
    expected = np.floor((ramp - 100.0) / (ramp.max() - 100.0) * 255 + 0.5).astype(np.uint8)
    for source in (path, ramp, PIL.Image.open(path)):
        got = load_image(source)
        assert np.array_equal(got, np.repeat(expected[:, :, None], 3, axis=2))
    assert not load_image(np.full((5, 5), 7, dtype=np.int32)).any()  # constant: zeros, no NaN


def test_load_image_float_and_bool_arrays():
    """Documented deviation: float arrays in [0, 1] are quantised with round(x * 255)."""
    values = np.array([[0.0, 0.5, 1.0, 0.2 / 255]], dtype=np.float32)
    assert load_image(values)[0, :, 0].tolist() == [0, 128, 255, 0]
    assert load_image(np.array([[True, False]]))[0, :, 1].tolist() == [255, 0]
    assert load_image(torch.zeros(3, 4, 3, dtype=torch.uint8)).shape == (3, 4, 3)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.full((4, 4, 3), 1.5, dtype=np.float32), r"\[0, 1\]"),
        (np.zeros((4, 4), dtype=np.complex64), "complex64"),
        (np.zeros((4, 4, 2), dtype=np.uint8), "channels-last"),
        (np.zeros((0, 4, 3), dtype=np.uint8), "empty"),
        (12, "unsupported image source"),
    ],
)
def test_load_image_rejects_bad_arrays(bad, message):
    with pytest.raises(ImageError, match=message):
        load_image(bad)


def test_load_image_missing_and_corrupt_files(tmp_path):
    """Missing, truncated and garbage files are ImageErrors that name the path (a long run logs and
    skips them instead of dying in PIL)."""
    missing = tmp_path / "nope.png"
    with pytest.raises(ImageError, match="not found.*nope.png"):
        load_image(missing)
    good = tmp_path / "good.png"
    PIL.Image.fromarray(_rgb(64, 64, 14)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all" * 10)
    for path in (truncated, garbage):
        with pytest.raises(ImageError, match=path.name):
            load_image(path)
    with pytest.raises(ImageError, match="not a file"):
        load_image(tmp_path)
    with pytest.raises(ImageError):
        preprocess([str(good), str(garbage)], min_pixels=SMALL_MIN, max_pixels=SMALL_MAX)


def test_load_image_sniffs_extensionless_dicom(tmp_path):
    """A DICOM file without a .dcm suffix is recognised by the 'DICM' magic at byte 128."""
    get_testdata_file = pytest.importorskip("pydicom.data", reason="pydicom is not installed").get_testdata_file

    from lingshu_fast.data.dicom import read_dicom

    source = get_testdata_file("CT_small.dcm")
    target = tmp_path / "IM000123"
    shutil.copy(source, target)
    assert np.array_equal(load_image(target), read_dicom(source))
    assert load_image(target).shape == (128, 128, 3)


def test_preprocess_single_image_and_bf16():
    """A single (non-list) image is accepted; bf16 output is the fp32 output rounded by torch."""
    image = _rgb(30, 30, 15)
    fp32, grid = preprocess(image, min_pixels=SMALL_MIN, max_pixels=SMALL_MAX)
    bf16, grid_bf16 = preprocess([image], min_pixels=SMALL_MIN, max_pixels=SMALL_MAX, out_dtype=torch.bfloat16)
    assert grid.tolist() == [[1, 4, 4]] and torch.equal(grid, grid_bf16)
    assert torch.equal(bf16, fp32.to(torch.bfloat16))


def test_one_vision_geometry_and_models_that_differ_are_refused(tmp_path):
    """The patch/merge/temporal sizes live in one module; the data side, the image kernel and the
    model's vision config agree, and a checkpoint with another geometry is a one-line config error."""
    import json

    from lingshu_fast.config import ConfigError
    from lingshu_fast.data import images
    from lingshu_fast.kernels import image_pack
    from lingshu_fast.kernels import vision_geometry as geo
    from lingshu_fast.model.config import architecture_config, load_hf_config

    assert (images.PATCH_SIZE, images.MERGE_SIZE, images.FACTOR) == (geo.PATCH_SIZE, geo.MERGE_SIZE, geo.FACTOR)
    assert (image_pack.PATCH_SIZE, image_pack.MERGE_SIZE) == (geo.PATCH_SIZE, geo.MERGE_SIZE)
    assert geo.image_tokens(1, 36, 52) == 36 * 52 // 4
    for name in ("qwen2.5-vl-7b", "qwen2.5-vl-32b"):
        assert geo.geometry_mismatch(architecture_config(name).vision_config) is None
    raw = json.loads(architecture_config("qwen2.5-vl-7b").to_json_string())
    raw["vision_config"]["spatial_merge_size"] = 4
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"spatial_merge_size=4 \(supported: 2\)"):
        load_hf_config(str(tmp_path))
