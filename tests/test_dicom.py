"""lingshu_fast.data.dicom.read_dicom on pydicom's real CT/MR/RT/colour test files and edited copies.

Expected values are computed here independently, pixel by pixel in plain Python from the DICOM
PS3.3 C.11.2.1.2 formulas (or, for min-max, from the stored values and the rescale), rounded half up
as read_dicom documents. The comparison is exact: both sides evaluate the same float64 expression
per pixel, so a mismatch means a wrong window, rescale, frame, inversion or rounding rule.
"""
import math

import numpy as np
import pytest

# pydicom is a dependency of the package, but a machine may lack it (the lent GPU machines do):
# skip the module there instead of breaking the whole session's collection.
pydicom = pytest.importorskip("pydicom", reason="pydicom is not installed (pip install pydicom)")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402

from lingshu_fast.data.dicom import read_dicom  # noqa: E402
from lingshu_fast.data.images import ImageError  # noqa: E402


def _round_half_up(y: float) -> int:
    return int(math.floor(min(max(y, 0.0), 255.0) + 0.5))


def _linear(x: float, center: float, width: float) -> int:
    if x <= center - 0.5 - (width - 1) / 2:
        return 0
    if x > center - 0.5 + (width - 1) / 2:
        return 255
    return _round_half_up(((x - (center - 0.5)) / (width - 1) + 0.5) * 255)


def _expected(values: np.ndarray, pixel) -> np.ndarray:
    out = np.array([pixel(float(v)) for v in values.ravel()], dtype=np.uint8).reshape(values.shape)
    return np.repeat(out[:, :, None], 3, axis=2)


def _stored(name: str) -> tuple[Dataset, np.ndarray]:
    ds = pydicom.dcmread(get_testdata_file(name))
    return ds, ds.pixel_array.astype(np.float64)


def _save(ds: Dataset, tmp_path, name: str) -> str:
    path = str(tmp_path / name)
    ds.save_as(path)
    return path


def test_mr_uses_file_window():
    """MR_small carries WindowCenter 600 / WindowWidth 1600 and no rescale: the LINEAR window."""
    ds, stored = _stored("MR_small.dcm")
    assert float(ds.WindowCenter) == 600 and float(ds.WindowWidth) == 1600
    got = read_dicom(get_testdata_file("MR_small.dcm"))
    assert got.dtype == np.uint8 and got.shape == (64, 64, 3)
    assert np.array_equal(got, _expected(stored, lambda x: _linear(x, 600.0, 1600.0)))


def test_ct_without_window_is_minmax_of_hounsfield_units():
    """CT_small has RescaleIntercept -1024 and no window: min-max stretch of the HU values."""
    ds, stored = _stored("CT_small.dcm")
    assert "WindowCenter" not in ds
    hu = stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    low, high = hu.min(), hu.max()
    got = read_dicom(get_testdata_file("CT_small.dcm"))
    assert np.array_equal(got, _expected(hu, lambda x: _round_half_up((x - low) / (high - low) * 255)))
    assert got.min() == 0 and got.max() == 255


def test_ct_window_applies_after_rescale_first_value_of_multivalued(tmp_path):
    """A soft-tissue window given in HU (after RescaleSlope 2 / Intercept -1024); the file lists two
    windows: the first is used."""
    ds, stored = _stored("CT_small.dcm")
    ds.RescaleSlope = 2
    ds.WindowCenter = [40, 300]
    ds.WindowWidth = [400, 1500]
    hu = stored * 2 - 1024
    got = read_dicom(_save(ds, tmp_path, "ct_window.dcm"))
    expected = _expected(hu, lambda x: _linear(x, 40.0, 400.0))
    assert np.array_equal(got, expected)
    assert 0 < (got == 0).mean() < 1 and 0 < (got == 255).mean() < 1  # the window really clips


def test_monochrome1_is_inverted(tmp_path):
    """MONOCHROME1 stores 0 as white: the rendered image is 255 minus the MONOCHROME2 rendering,
    both with a window and with min-max."""
    ds, stored = _stored("MR_small.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"
    windowed = read_dicom(_save(ds, tmp_path, "m1_window.dcm"))
    assert np.array_equal(windowed, 255 - _expected(stored, lambda x: _linear(x, 600.0, 1600.0)))
    del ds.WindowCenter, ds.WindowWidth
    low, high = stored.min(), stored.max()
    stretched = read_dicom(_save(ds, tmp_path, "m1_minmax.dcm"))
    assert np.array_equal(stretched, 255 - _expected(stored, lambda x: _round_half_up((x - low) / (high - low) * 255)))


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
def test_other_voi_lut_functions(tmp_path, function):
    """VOILUTFunction LINEAR_EXACT and SIGMOID (PS3.3 C.11.2.1.3.1/.3.2) on the MR window."""
    ds, stored = _stored("MR_small.dcm")
    ds.VOILUTFunction = function
    if function == "LINEAR_EXACT":
        def pixel(x):
            return 0 if x <= 600 - 800 else 255 if x > 600 + 800 else _round_half_up(((x - 600) / 1600 + 0.5) * 255)
    else:
        def pixel(x):
            return _round_half_up(255 / (1 + math.exp(-4 * (x - 600) / 1600)))
    assert np.array_equal(read_dicom(_save(ds, tmp_path, f"{function}.dcm")), _expected(stored, pixel))


def test_invalid_window_width_falls_back_to_minmax(tmp_path):
    """A LINEAR width below 1 is forbidden by the standard: min-max instead of a division by zero."""
    ds, stored = _stored("MR_small.dcm")
    ds.WindowWidth = 0
    low, high = stored.min(), stored.max()
    got = read_dicom(_save(ds, tmp_path, "w0.dcm"))
    assert np.array_equal(got, _expected(stored, lambda x: _round_half_up((x - low) / (high - low) * 255)))


def test_voi_lut_sequence_used_when_no_window(tmp_path):
    """A VOI LUT Sequence (table) maps stored values; its 8-bit output is used as is."""
    ds, stored = _stored("MR_small.dcm")
    del ds.WindowCenter, ds.WindowWidth
    first, entries = int(stored.min()), 256
    lut = Dataset()
    lut.add_new(0x00283002, "SS" if first < 0 else "US", [entries, first, 8])  # LUTDescriptor
    lut.add_new(0x00283006, "US", [(i * 7) % 256 for i in range(entries)])  # LUTData, non-monotone
    ds.VOILUTSequence = Sequence([lut])
    got = read_dicom(_save(ds, tmp_path, "lut.dcm"))
    table = lut.LUTData
    assert np.array_equal(got, _expected(stored, lambda x: table[min(max(int(x) - first, 0), entries - 1)]))


def test_multiframe_uses_middle_frame():
    """rtdose.dcm has 15 frames: frame 7 (NumberOfFrames // 2), min-max stretched on its own."""
    ds = pydicom.dcmread(get_testdata_file("rtdose.dcm"))
    frames = ds.pixel_array.astype(np.float64)
    assert frames.shape[0] == 15
    middle = frames[7]
    low, high = middle.min(), middle.max()
    got = read_dicom(get_testdata_file("rtdose.dcm"))
    assert np.array_equal(got, _expected(middle, lambda x: _round_half_up((x - low) / (high - low) * 255)))
    # an RGB two-frame file: frame 1, unchanged (8-bit RGB stays RGB)
    rgb_frames = pydicom.dcmread(get_testdata_file("SC_rgb_rle_2frame.dcm")).pixel_array
    assert np.array_equal(read_dicom(get_testdata_file("SC_rgb_rle_2frame.dcm")), rgb_frames[1])


def test_enhanced_multiframe_window_from_functional_groups(tmp_path):
    """Enhanced CT/MR keep the window in functional groups: the shared group's window applies when
    there is none at the top level, and the middle frame's own (per-frame) window wins over it."""
    ds, stored = _stored("MR_small.dcm")
    voi = Dataset()
    voi.WindowCenter, voi.WindowWidth = ds.WindowCenter, ds.WindowWidth
    shared = Dataset()
    shared.FrameVOILUTSequence = Sequence([voi])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    del ds.WindowCenter, ds.WindowWidth
    got = read_dicom(_save(ds, tmp_path, "shared.dcm"))
    assert np.array_equal(got, _expected(stored, lambda x: _linear(x, 600.0, 1600.0)))

    dose = pydicom.dcmread(get_testdata_file("rtdose.dcm"))
    middle = dose.pixel_array[7].astype(np.float64)
    center, width = float(np.median(middle)), float(middle.max() - middle.min()) / 2
    per_frame = []
    for i in range(15):
        item_voi = Dataset()
        item_voi.WindowCenter, item_voi.WindowWidth = (center, width) if i == 7 else (-1e6, 10)
        group = Dataset()
        group.FrameVOILUTSequence = Sequence([item_voi])
        per_frame.append(group)
    dose.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    path = _save(dose, tmp_path, "per_frame.dcm")
    got = read_dicom(path)
    saved = pydicom.dcmread(path).PerFrameFunctionalGroupsSequence[7].FrameVOILUTSequence[0]  # DS as stored
    center, width = float(saved.WindowCenter), float(saved.WindowWidth)
    assert np.array_equal(got, _expected(middle, lambda x: _linear(x, center, width)))


def test_file_without_preamble_is_read(tmp_path):
    """Old files without the 128-byte preamble and 'DICM' (no file meta) are still read, with the
    transfer syntax pydicom detects."""
    from pydicom.dataset import FileMetaDataset

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.preamble, ds.file_meta = None, FileMetaDataset()
    path = str(tmp_path / "acr_nema.dcm")
    pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert open(path, "rb").read(132)[128:] != b"DICM"
    assert np.array_equal(read_dicom(path), read_dicom(get_testdata_file("CT_small.dcm")))


def test_rgb_and_palette_stay_colour():
    """RGB DICOM is returned as is; YBR is converted to RGB by pydicom; 16-bit colour and 16-bit
    palettes keep their top 8 bits."""
    rgb = pydicom.dcmread(get_testdata_file("examples_rgb_color.dcm")).pixel_array
    assert np.array_equal(read_dicom(get_testdata_file("examples_rgb_color.dcm")), rgb)
    deep = pydicom.dcmread(get_testdata_file("SC_rgb_rle_16bit.dcm")).pixel_array
    assert np.array_equal(read_dicom(get_testdata_file("SC_rgb_rle_16bit.dcm")), (deep >> 8).astype(np.uint8))
    palette_ds = pydicom.dcmread(get_testdata_file("examples_palette.dcm"))
    colours = pydicom.pixels.apply_color_lut(palette_ds.pixel_array, palette_ds)
    got = read_dicom(get_testdata_file("examples_palette.dcm"))
    assert got.shape == (350, 800, 3) and np.array_equal(got, (colours >> 8).astype(np.uint8))
    ybr = read_dicom(get_testdata_file("SC_ybr_full_422_uncompressed.dcm"))
    assert ybr.shape == (100, 100, 3) and ybr.dtype == np.uint8


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_constant_image_gives_zeros_not_nan(tmp_path, photometric):
    """A flat frame (max == min) has no contrast: zeros, with no division by zero or NaN."""
    ds, stored = _stored("CT_small.dcm")
    ds.PixelData = np.full(stored.shape, 100, dtype=np.int16).tobytes()
    ds.PhotometricInterpretation = photometric
    got = read_dicom(_save(ds, tmp_path, "flat.dcm"))
    assert got.shape == (128, 128, 3) and not got.any()


def test_missing_corrupt_and_imageless_files_raise_image_error(tmp_path):
    """Every failure names the file and says why, as an ImageError the loader can count and skip."""
    with pytest.raises(ImageError, match="not found.*absent.dcm"):
        read_dicom(tmp_path / "absent.dcm")
    with pytest.raises(ImageError, match="MR_truncated.dcm.*cannot decode"):
        read_dicom(get_testdata_file("MR_truncated.dcm"))
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\x00" * 128 + b"NOPE" + b"\x01" * 64)
    with pytest.raises(ImageError, match="garbage.dcm.*not a DICOM"):
        read_dicom(garbage)
    half = tmp_path / "half.dcm"
    half.write_bytes(open(get_testdata_file("CT_small.dcm"), "rb").read()[:1000])
    with pytest.raises(ImageError, match="half.dcm"):
        read_dicom(half)
    with pytest.raises(ImageError, match="no PixelData"):
        read_dicom(get_testdata_file("rtplan.dcm"))
