"""Images for Qwen2.5-VL: load (PIL, arrays, JPEG/PNG/DICOM files) -> smart-resize (uint8, CPU) -> pack.

The split: the CPU side ends with resized **uint8** RGB images; the normalise +
patchify step is one function, `lingshu_fast.kernels.image_pack.pack_images` (a Triton kernel on
GPU, plain torch on CPU), so uint8 rather than fp32 crosses the host-to-device link.

`preprocess` equals transformers' `Qwen2VLImageProcessorPil` bit for bit on uint8 input:
- RGB conversion as transformers does it: PIL images with alpha (or a transparency key) are composited
  onto white by PIL; RGBA arrays by `round(a/255 * rgb + (1 - a/255) * 255)`; grey is repeated 3x.
  No EXIF transpose (transformers does none either).
- `smart_resize` to multiples of 28 within [min_pixels, max_pixels], then PIL bicubic resize of the
  uint8 RGB image (transformers converts its channel-first array back to a PIL image for this).
- rescale `float32(float64(x) * (1/255))`, then `(x - mean) / std` in float32 with the CLIP mean/std.
Deviations (documented, deliberate):
- float arrays must lie in [0, 1] and are quantised with round(x * 255) before resizing. transformers
  would truncate them to uint8 for the PIL resize and then rescale by 1/255 twice, which is a bug,
  not a behaviour worth copying.
- deeper-than-8-bit grey (16-bit PNG/TIFF: PIL modes I;16*, I, F) and integer arrays other than uint8
  are stretched min-max to 8 bits (as DICOM without a window; a constant image gives zeros).
  transformers lets PIL clip them at 255, which turns a 16-bit X-ray PNG almost entirely white.
- errors are `ImageError` (a ValueError) naming the source and the reason, never a bare traceback.
"""
from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import PIL.Image
import torch

from lingshu_fast.kernels.vision_geometry import FACTOR, MERGE_SIZE, PATCH_SIZE

DEFAULT_MIN_PIXELS = 56 * 56  # transformers' Qwen2VLImageProcessorPil defaults
DEFAULT_MAX_PIXELS = 28 * 28 * 1280
MAX_ASPECT_RATIO = 200
DICOM_SUFFIXES = (".dcm", ".dicom")
HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # PIL grey modes deeper than 8 bits


class ImageError(ValueError):
    """An image that cannot be used: missing, corrupt, or of an unsupported shape/dtype."""


def is_dicom_file(path: str | os.PathLike) -> bool:
    """A `.dcm`/`.dicom` name, or the magic 'DICM' after the 128-byte preamble of DICOM Part 10 files
    (extensionless files): the one DICOM sniff of the data path. An unreadable file is not DICOM
    here; opening it then reports why."""
    if Path(path).suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def read_image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image file from its header, without decoding the pixels (PIL opens
    lazily; DICOM through pydicom with stop_before_pixels). ImageError when it is not a readable image."""
    try:
        if is_dicom_file(path):
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True)
            return int(ds.Rows), int(ds.Columns)
        with PIL.Image.open(path) as image:
            width, height = image.size
        return int(height), int(width)
    except Exception as err:  # noqa: BLE001 - PIL/pydicom raise many types for a bad file
        raise ImageError(f"cannot read image header of {path} ({type(err).__name__}: {err})") from None


def minmax_to_uint8(values: np.ndarray) -> np.ndarray:
    """Linear stretch of [min, max] onto [0, 255]; a constant (or empty-range) frame gives zeros."""
    x = values.astype(np.float64)
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        return np.zeros(x.shape, dtype=np.uint8)
    low, high = float(finite.min()), float(finite.max())
    if high <= low:
        return np.zeros(x.shape, dtype=np.uint8)
    y = np.nan_to_num((x - low) / (high - low) * 255.0, nan=0.0, posinf=255.0, neginf=0.0)
    return np.floor(np.clip(y, 0.0, 255.0) + 0.5).astype(np.uint8)


def _pil_rgb(image: PIL.Image.Image):
    """An RGB PIL image, or (deeper than 8-bit grey) a uint8 RGB array."""
    if image.mode in HIGH_BIT_DEPTH_MODES:
        # Deviation: PIL's convert("RGB") clips 16/32-bit grey at 255, so a 16-bit X-ray PNG would come
        # out almost all white (transformers has this flaw); stretch min-max as DICOM without a window.
        grey = minmax_to_uint8(np.asarray(image))
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    # Same rule as transformers' convert_to_rgb: alpha (band or palette transparency) -> onto white.
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _pil_to_rgb(image: PIL.Image.Image) -> np.ndarray:
    rgb = _pil_rgb(image)
    return rgb if isinstance(rgb, np.ndarray) else np.asarray(rgb, dtype=np.uint8)


def _array_to_rgb(array: np.ndarray, name: str) -> np.ndarray:
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ImageError(
            f"{name}: array of shape {tuple(array.shape)} is not an image; expected channels-last "
            "HxW, HxWx1, HxWx3 or HxWx4"
        )
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif np.issubdtype(array.dtype, np.floating):
        if array.size and (not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0):
            raise ImageError(f"{name}: float image values must lie in [0, 1] (got dtype {array.dtype})")
        array = np.floor(array.astype(np.float64) * 255.0 + 0.5).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer) and array.dtype != np.uint8:
        array = minmax_to_uint8(array)  # 16/32-bit data: stretched jointly over all channels
    elif array.dtype != np.uint8:
        raise ImageError(f"{name}: dtype {array.dtype} is not supported; give uint8, integer or float [0, 1] pixels")
    channels = array.shape[2]
    if channels == 1:
        return np.ascontiguousarray(np.repeat(array, 3, axis=2))
    if channels == 4:
        # transformers' numpy rule: blend onto white in float64, round half to even.
        alpha = array[..., 3:4] / 255.0
        blended = alpha * array[..., :3] + (1.0 - alpha) * 255.0
        return np.round(blended).astype(np.uint8)
    return np.ascontiguousarray(array)


def _open_file(path: Path) -> np.ndarray:
    return _as_array(_decode_file(path))


def _as_array(image) -> np.ndarray:
    return image if isinstance(image, np.ndarray) else np.asarray(image, dtype=np.uint8)


def _decode_file(path: Path):
    """A file -> RGB PIL image (8-bit files) or uint8 RGB array (DICOM, deeper grey)."""
    if not path.exists():
        raise ImageError(f"image file not found: {path}")
    if not path.is_file():
        raise ImageError(f"image path is not a file: {path}")
    if is_dicom_file(path):
        from lingshu_fast.data.dicom import read_dicom  # lazy: dicom.py imports ImageError from here

        return read_dicom(path)
    try:
        with PIL.Image.open(path) as image:
            image.load()  # decode now, inside the try: PIL is lazy and truncation shows up here
            rgb = _pil_rgb(image)
            if rgb is image:  # already RGB: detach it from the file before the `with` closes it
                rgb = image.copy()
            return rgb
    except PIL.Image.DecompressionBombError as err:
        raise ImageError(f"{path}: image too large to decode safely ({err})") from err
    except (PIL.UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{path}: corrupt or unsupported image file ({type(err).__name__}: {err})") from err


def load_image(source: Any) -> np.ndarray:
    """Any supported image -> contiguous uint8 RGB array [H, W, 3].

    `source`: a PIL image; a numpy array or CPU torch tensor (channels-last HxW, HxWx1, HxWx3, HxWx4;
    uint8, bool, or float in [0, 1]); or a path (str/Path) to a file PIL reads (JPEG, PNG, ...) or a
    DICOM file (`.dcm`/`.dicom`, or any file with the 'DICM' magic at byte 128).
    Raises ImageError on a missing, corrupt, empty or unsupported image.
    """
    if isinstance(source, PIL.Image.Image):
        name = f"PIL image ({source.mode} {source.size[0]}x{source.size[1]})"
        rgb = _pil_to_rgb(source)
    elif isinstance(source, (str, os.PathLike)):
        name = str(source)
        rgb = _open_file(Path(source))
    elif isinstance(source, torch.Tensor):
        name = f"tensor {tuple(source.shape)}"
        rgb = _array_to_rgb(source.detach().cpu().numpy(), name)
    elif isinstance(source, np.ndarray):
        name = f"array {tuple(source.shape)}"
        rgb = _array_to_rgb(source, name)
    else:
        raise ImageError(f"unsupported image source of type {type(source).__name__}; give a path, PIL image or array")
    if rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageError(f"{name}: empty image ({rgb.shape[0]}x{rgb.shape[1]})")
    return rgb


def smart_resize(
    height: int,
    width: int,
    factor: int = FACTOR,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[int, int]:
    """(height, width) -> the resized (h, w): multiples of `factor`, h*w within [min_pixels, max_pixels],
    aspect ratio kept as closely as possible. The same arithmetic as transformers' qwen2_vl
    `smart_resize`; its ValueError for an aspect ratio over 200 (and its ZeroDivisionError for an empty
    image) are ImageError here."""
    if height < 1 or width < 1:
        raise ImageError(f"image of {height}x{width} pixels is empty; nothing to resize")
    if min_pixels > max_pixels:
        raise ImageError(f"min_pixels={min_pixels} is larger than max_pixels={max_pixels}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise ImageError(
            f"image of {height}x{width} pixels has aspect ratio {ratio:.1f}, over the {MAX_ASPECT_RATIO} "
            "Qwen2.5-VL accepts; crop or pad it"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    if h_bar < factor or w_bar < factor:
        # Only reachable with min_pixels <= 0 and a side under factor/2; transformers would return 0.
        raise ImageError(f"image of {height}x{width} pixels resizes to {h_bar}x{w_bar}; raise min_pixels")
    return h_bar, w_bar


def grid_thw(height: int, width: int, *, min_pixels: int, max_pixels: int) -> tuple[int, int, int]:
    """(t, h, w) patch grid of one image of `height` x `width` pixels after smart_resize, exactly as
    `preprocess` will give it; its LLM token count is t*h*w / MERGE_SIZE**2."""
    rh, rw = smart_resize(height, width, FACTOR, min_pixels, max_pixels)
    return 1, rh // PATCH_SIZE, rw // PATCH_SIZE


def smart_resize_many(heights: np.ndarray, widths: np.ndarray, *, min_pixels: int,
                      max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """`smart_resize` of many sizes at once (int64 arrays), the same float64 arithmetic in the same
    order (np.round is round-half-even as Python's round; true division and sqrt are correctly
    rounded in both), so every entry equals the scalar rule's. The sizes must already be valid
    (aspect ratio <= 200: the index rejects the others as corrupt_image)."""
    h = np.asarray(heights, dtype=np.int64)
    w = np.asarray(widths, dtype=np.int64)
    f = FACTOR
    h_bar = np.round(h / f).astype(np.int64) * f
    w_bar = np.round(w / f).astype(np.int64) * f
    area = h * w
    big = h_bar * w_bar > max_pixels
    small = ~big & (h_bar * w_bar < min_pixels)
    with np.errstate(divide="ignore", invalid="ignore"):
        beta = np.sqrt(area / max_pixels)
        big_h = np.maximum(f, np.floor(h / beta / f).astype(np.int64) * f)
        big_w = np.maximum(f, np.floor(w / beta / f).astype(np.int64) * f)
        beta = np.sqrt(min_pixels / area)
        small_h = np.ceil(h * beta / f).astype(np.int64) * f
        small_w = np.ceil(w * beta / f).astype(np.int64) * f
    h_bar = np.where(big, big_h, np.where(small, small_h, h_bar))
    w_bar = np.where(big, big_w, np.where(small, small_w, w_bar))
    return h_bar, w_bar


def image_token_counts(heights: np.ndarray, widths: np.ndarray, *, min_pixels: int, max_pixels: int) -> np.ndarray:
    """LLM tokens of each image (t*h*w / MERGE_SIZE**2 of its grid), int64."""
    rh, rw = smart_resize_many(heights, widths, min_pixels=min_pixels, max_pixels=max_pixels)
    return (rh // PATCH_SIZE) * (rw // PATCH_SIZE) // (MERGE_SIZE * MERGE_SIZE)


def resize_image(
    image: np.ndarray, *, min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> uint8 RGB [h, w, 3] with (h, w) = smart_resize(H, W), resized by PIL's
    bicubic filter exactly as Qwen2VLImageProcessorPil does (also when the size does not change)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(
            f"resize_image wants uint8 [H, W, 3], got {image.dtype} {tuple(image.shape)}; use load_image first"
        )
    height, width = image.shape[:2]
    new_height, new_width = smart_resize(height, width, FACTOR, min_pixels, max_pixels)
    resized = PIL.Image.fromarray(np.ascontiguousarray(image)).resize(
        (new_width, new_height), resample=PIL.Image.Resampling.BICUBIC
    )
    return np.asarray(resized, dtype=np.uint8)


def resize_images(
    images: Iterable[Any], *, min_pixels: int = DEFAULT_MIN_PIXELS, max_pixels: int = DEFAULT_MAX_PIXELS
) -> list[np.ndarray]:
    """load_image + resize_image for each image: the whole CPU side of preprocessing. Files and PIL
    images are resized as the decoded PIL image (no array round trip: the same pixels, two fewer
    copies of the full-size image)."""
    out = []
    for im in images:
        if isinstance(im, (str, os.PathLike)):
            decoded = _decode_file(Path(im))
        elif isinstance(im, PIL.Image.Image):
            decoded = _pil_rgb(im)
        else:
            decoded = load_image(im)
        if isinstance(decoded, np.ndarray):
            out.append(resize_image(load_image(decoded), min_pixels=min_pixels, max_pixels=max_pixels))
            continue
        width, height = decoded.size
        if height == 0 or width == 0:
            raise ImageError(f"{im if isinstance(im, (str, os.PathLike)) else 'PIL image'}: empty image ({height}x{width})")
        new_height, new_width = smart_resize(height, width, FACTOR, min_pixels, max_pixels)
        out.append(np.asarray(decoded.resize((new_width, new_height), resample=PIL.Image.Resampling.BICUBIC),
                              dtype=np.uint8))
    return out


def grid_of(sizes: torch.Tensor) -> torch.Tensor:
    """(t, h, w) grids [n, 3] int64 of resized images of `sizes` [n, 2] (the kernel's own rule)."""
    from lingshu_fast.kernels.image_pack import grid_of_sizes

    return grid_of_sizes(sizes)


def concat_uint8(resized: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Resized uint8 images -> (flat_uint8 [sum(h*w*3)], sizes [n, 2] int64), the input of pack_images."""
    if len(resized) == 0:
        raise ImageError("no images to pack")
    flat = np.concatenate([np.ascontiguousarray(im).reshape(-1) for im in resized])
    sizes = torch.tensor([im.shape[:2] for im in resized], dtype=torch.int64)
    return torch.from_numpy(flat), sizes


@functools.lru_cache(maxsize=1)
def _host_table() -> np.ndarray:
    """[3, 256] float32: the normalised value of each (channel, byte), by the kernel's own formula."""
    from lingshu_fast.kernels.image_pack import normalise_uint8

    all_bytes = torch.arange(256, dtype=torch.uint8)[:, None].expand(256, 3)
    return normalise_uint8(all_bytes).t().contiguous().numpy()


def pack_host(flat_uint8: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Resized images as bytes (`concat_uint8`'s layout, numpy) -> float32 `pixel_values [P, 1176]`
    on the host, equal bit for bit to `pack_images` (same rows, same table values; tests pin it).

    Why not `pack_images` on a CPU tensor: its torch reference gathers through int64 indices and
    broadcasts in torch's thread pool, which on a busy host spins; this is single-threaded numpy,
    patchifying the bytes first (1 byte moved per value) and mapping each channel through its
    256-entry table with `take` straight into the output (~8x faster on one core)."""
    table = _host_table()
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    rows = int((sizes[:, 0] * sizes[:, 1]).sum()) // (PATCH_SIZE * PATCH_SIZE)
    out = np.empty((rows, 3, 2, PATCH_SIZE * PATCH_SIZE), dtype=np.float32)
    row, start = 0, 0
    for height, width in sizes.tolist():
        if height % FACTOR or width % FACTOR:
            raise ImageError(f"image of {height}x{width} is not smart-resized (sides must be multiples of {FACTOR})")
        n = height * width // (PATCH_SIZE * PATCH_SIZE)
        image = flat_uint8[start:start + height * width * 3].reshape(
            height // FACTOR, MERGE_SIZE, PATCH_SIZE, width // FACTOR, MERGE_SIZE, PATCH_SIZE, 3)
        patches = image.transpose(0, 3, 1, 4, 6, 2, 5).reshape(n, 3, PATCH_SIZE * PATCH_SIZE)
        for channel in range(3):
            np.take(table[channel], patches[:, channel], out=out[row:row + n, channel, 0])
        out[row:row + n, :, 1] = out[row:row + n, :, 0]  # the two temporal copies of a still image
        row, start = row + n, start + height * width * 3
    return out.reshape(rows, 3 * 2 * PATCH_SIZE * PATCH_SIZE)


def preprocess(
    images: Any,
    *,
    min_pixels: int = DEFAULT_MIN_PIXELS,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    out_dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (one, or a list of PIL images / arrays / paths incl. DICOM) ->
    (pixel_values [P, 1176] out_dtype, image_grid_thw [n, 3] int64), equal to transformers'
    Qwen2VLImageProcessorPil(min_pixels=..., max_pixels=...) for uint8 input.

    `device`: where to pack (e.g. "cuda"): the uint8 pixels are moved there first, then normalised and
    patchified there (Triton on CUDA), so only uint8 crosses the host-to-device link."""
    from lingshu_fast.kernels.image_pack import pack_images

    if not isinstance(images, (list, tuple)):
        images = [images]
    flat_uint8, sizes = concat_uint8(resize_images(images, min_pixels=min_pixels, max_pixels=max_pixels))
    if device is None and out_dtype == torch.float32:  # on the host: the fast host packer, same values
        return torch.from_numpy(pack_host(flat_uint8.numpy(), sizes.numpy())), grid_of(sizes)
    if device is not None:
        flat_uint8 = flat_uint8.to(device, non_blocking=True)
    return pack_images(flat_uint8, sizes, out_dtype=out_dtype)
