"""DICOM -> 8-bit RGB, the way a radiologist's viewer would first show it.

Pipeline for a grey (MONOCHROME1/2) image:
1. decode one frame with pydicom (multi-frame: the middle frame, index NumberOfFrames // 2; only that
   frame is decoded). Files without the preamble/'DICM' (ACR-NEMA style) are read if they hold an image;
2. modality LUT: RescaleSlope/RescaleIntercept (or a Modality LUT Sequence) -> e.g. Hounsfield units.
   Enhanced multi-frame files keep rescale and window in functional groups: the shared group's values
   are used, overridden by the chosen frame's own;
3. VOI: the file's first WindowCenter/WindowWidth (with its VOILUTFunction: LINEAR, LINEAR_EXACT or
   SIGMOID, DICOM PS3.3 C.11.2.1.2) mapped onto [0, 255]; else the file's VOI LUT Sequence; else
   min-max of the frame. The window wins over a LUT sequence when both exist (viewers default to it).
   A width that the standard forbids (< 1 for LINEAR, <= 0 otherwise) is ignored -> min-max;
4. MONOCHROME1 (0 = white) is inverted so that 255 is always white;
5. round half up to uint8 and repeat to 3 channels. A constant frame (no contrast) gives zeros, never NaN.
Colour images: YBR is converted to RGB by pydicom; RGB/PALETTE COLOR of more than 8 bits are scaled
from their bit depth to 8 bits. Every failure is an ImageError naming the file and the reason.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from lingshu_fast.data.images import ImageError, minmax_to_uint8

log = logging.getLogger(__name__)

_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _first(value) -> float:
    """DICOM multi-valued elements (e.g. several windows): the first one is the default."""
    if value is None:
        raise ValueError("missing")
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        if len(value) == 0:
            raise ValueError("empty")
        value = value[0]
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"not finite: {value}")
    return result


def window_to_uint8(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """The DICOM VOI window (PS3.3 C.11.2.1.2.1/.2/.3) onto [0, 255], rounded half up."""
    x = values.astype(np.float64)
    function = function.upper()
    if function == "SIGMOID":
        y = 255.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    elif function == "LINEAR_EXACT":
        y = np.clip(((x - center) / width + 0.5) * 255.0, 0.0, 255.0)
    else:  # LINEAR: the 0.5 and (w - 1) shifts are the standard's, for integer-valued stored pixels
        low = center - 0.5 - (width - 1.0) / 2.0
        high = center - 0.5 + (width - 1.0) / 2.0
        ramp = ((x - (center - 0.5)) / max(width - 1.0, 1e-12) + 0.5) * 255.0
        y = np.where(x <= low, 0.0, np.where(x > high, 255.0, ramp))
    return np.floor(np.clip(y, 0.0, 255.0) + 0.5).astype(np.uint8)


def _window_of(ds) -> tuple[float, float, str] | None:
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    try:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
    except (TypeError, ValueError) as err:
        log.warning("ignoring unreadable WindowCenter/WindowWidth (%s); using min-max", err)
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        log.warning("unknown VOILUTFunction %r; using LINEAR", function)
        function = "LINEAR"
    if width < 1.0 if function == "LINEAR" else width <= 0.0:
        log.warning("ignoring invalid WindowWidth %s for %s; using min-max", width, function)
        return None
    return center, width, function


def _voi_table_to_uint8(values: np.ndarray, item, ds) -> np.ndarray:
    """VOI LUT Sequence item (PS3.3 C.11.2.1.1): values below the first mapped value take entry 0,
    above the table the last entry; the entries' bit depth is scaled to 8 bits. Done here rather than
    with pydicom's apply_voi_lut, which indexes in the table's dtype and wraps around for 8-bit tables
    whose input range exceeds 255 (pydicom 3.0)."""
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    entries = entries or 65536  # 0 encodes 2**16
    if first >= 2**15 and int(ds.get("PixelRepresentation", 0)) == 1:
        first -= 2**16  # descriptor stored as US while the pixels are signed
    data = item["LUTData"]
    if data.VR == "OW":
        little = getattr(ds, "original_encoding", (None, True))[1] is not False
        table = np.frombuffer(bytes(data.value), dtype="<u2" if little else ">u2")[:entries]
    else:
        table = np.asarray(data.value, dtype=np.int64).reshape(-1)[:entries]
    if table.size < entries:
        raise ValueError(f"VOI LUT holds {table.size} entries, its descriptor says {entries}")
    index = np.clip(np.floor(values.astype(np.float64)) - first, 0, entries - 1).astype(np.int64)
    mapped = table.astype(np.float64)[index] / float(2**bits - 1) * 255.0
    return np.floor(np.clip(mapped, 0.0, 255.0) + 0.5).astype(np.uint8)


def _grey_to_uint8(frame: np.ndarray, ds) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    values = apply_modality_lut(frame, ds)
    window = _window_of(ds)
    if window is not None:
        grey = window_to_uint8(values, *window)
    elif "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0:
        grey = _voi_table_to_uint8(values, ds.VOILUTSequence[0], ds)
    else:
        grey = minmax_to_uint8(values)
        if not grey.any():
            return grey  # a constant frame has no contrast to show: zeros, whatever the photometric
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        grey = 255 - grey
    return grey


def _colour_to_uint8(rgb: np.ndarray, bits: int) -> np.ndarray:
    """Keep the top 8 bits of deeper colour data: a 16-bit palette holding k * 256 gives back k."""
    if rgb.dtype == np.uint8:
        return rgb
    values = rgb.astype(np.int64)
    if bits >= 8:
        return np.clip(values >> (bits - 8), 0, 255).astype(np.uint8)
    return np.clip(values * 255 // (2**bits - 1), 0, 255).astype(np.uint8)


_FRAME_MACROS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")
_FRAME_KEYWORDS = ("RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth", "VOILUTFunction")


def _adopt_functional_groups(ds, index: int) -> None:
    """Enhanced multi-frame CT/MR keep rescale and window in functional groups, not at the top level:
    copy the shared group's values, then the chosen frame's (more specific, so they win), onto `ds`."""
    groups = []
    if ds.get("SharedFunctionalGroupsSequence"):
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame):
        groups.append(per_frame[index])
    for group in groups:
        for macro in _FRAME_MACROS:
            if group.get(macro):
                item = group[macro][0]
                for keyword in _FRAME_KEYWORDS:
                    if keyword in item:
                        setattr(ds, keyword, item[keyword].value)


def _read_dataset(path: Path):
    """dcmread; files without the 128-byte preamble + 'DICM' (old ACR-NEMA style) are read with
    force=True and accepted only if they hold an image, their transfer syntax taken from the encoding
    pydicom detected."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    try:
        return pydicom.dcmread(path)
    except InvalidDicomError as err:
        reason = err
    except Exception as err:  # truncated headers surface as EOFError/OSError/struct errors
        raise ImageError(f"{path}: unreadable DICOM file ({type(err).__name__}: {err})") from err
    try:
        ds = pydicom.dcmread(path, force=True)
        has_image = any(tag in ds for tag in _PIXEL_TAGS) and "Rows" in ds and "Columns" in ds
    except Exception:  # noqa: BLE001 - garbage read with force: report the original reason
        has_image = False
    if not has_image:
        raise ImageError(f"{path}: not a DICOM file ({reason})")
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit, little = ds.original_encoding
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
    return ds


def _decode_frame(ds, path: Path) -> np.ndarray:
    from pydicom.pixels import pixel_array

    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as err:
        raise ImageError(f"{path}: invalid NumberOfFrames {ds.get('NumberOfFrames')!r} ({err})") from err
    index = frames // 2 if frames > 1 else None
    _adopt_functional_groups(ds, index or 0)
    try:
        frame = pixel_array(ds, index=index)  # YBR_* -> RGB is pydicom's default
    except Exception as err:  # pydicom raises RuntimeError/ValueError/AttributeError/NotImplementedError
        raise ImageError(
            f"{path}: cannot decode the pixel data ({type(err).__name__}: {err}). Compressed transfer "
            "syntaxes may need pylibjpeg/pylibjpeg-openjpeg or python-gdcm installed"
        ) from err
    if frame.ndim == 4 or (frame.ndim == 3 and int(ds.get("SamplesPerPixel", 1)) == 1):
        frame = frame[frame.shape[0] // 2]  # a decoder that ignored `index`
    return frame


def read_dicom(path: str | Path) -> np.ndarray:
    """A DICOM file -> uint8 RGB [H, W, 3] (see the module docstring for the rules)."""
    from pydicom.pixels import apply_color_lut

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"DICOM file not found: {path}")
    ds = _read_dataset(path)
    if not any(tag in ds for tag in _PIXEL_TAGS):
        raise ImageError(f"{path}: DICOM file holds no image (no PixelData; SOP class {ds.get('SOPClassUID', '?')})")
    frame = _decode_frame(ds, path)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    try:
        if photometric == "PALETTE COLOR":
            lut_bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
            rgb = _colour_to_uint8(apply_color_lut(frame, ds), lut_bits)
        elif frame.ndim == 3 and frame.shape[-1] == 3:
            rgb = _colour_to_uint8(frame, int(ds.get("BitsStored", 8)))
        elif frame.ndim == 2:
            rgb = np.repeat(_grey_to_uint8(frame, ds)[:, :, None], 3, axis=2)
        else:
            raise ImageError(f"{path}: unsupported pixel layout {frame.shape} ({photometric})")
    except ImageError:
        raise
    except Exception as err:
        raise ImageError(f"{path}: cannot render {photometric} pixels to 8 bits ({type(err).__name__}: {err})") from err
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageError(f"{path}: empty image {rgb.shape[:2]}")
    return np.ascontiguousarray(rgb)
