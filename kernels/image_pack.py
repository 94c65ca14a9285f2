"""Image packing: smart-resized uint8 images -> Qwen2-VL `pixel_values` in one pass.

Input: the resized RGB images concatenated as one flat uint8 tensor (each image HWC, row-major) and
their sizes [n, 2] (h, w, multiples of 28). Output: `pixel_values [P, 1176]` (P = sum h*w/196) and
`image_grid_thw [n, 3] = (1, h/14, w/14)`, equal to transformers' Qwen2VLImageProcessorPil:
- value = (float32(float64(byte) * (1/255)) - mean_c) / std_c in float32, CLIP mean/std. With only 256
  bytes per channel, the kernel reads a 3x256 table built by that exact formula, so it matches the
  reference bit for bit (no fp32 re-association of 1/255 and 1/std);
- rows in 2x2-merge order: row = ((block_y * blocks_per_row + block_x) * 2 + sub_y) * 2 + sub_x for
  the 14x14 patch at (2*block_y + sub_y, 2*block_x + sub_x);
- inside a row: (channel, temporal, ph, pw), the temporal pair being two identical copies (a still
  image is repeated to fill temporal_patch_size=2).
`window_order=True` emits the rows already in the Qwen2.5-VL ViT's window-attention order (the
`window_index` permutation of 2x2 merge units), saving the model its gather.

The Triton kernel: one program per block of output rows. Each row finds its image by binary search
in a tiny prefix array (cu_rows, n+1 entries), gathers its 14x14x3 bytes straight from the flat
uint8 buffer (so only uint8 crosses the host-to-device link), maps them through the table and writes
the two temporal copies of each channel as contiguous 196-element runs. It is bandwidth-bound: per
pixel-channel 1 byte read, 8 (fp32) or 4 (bf16) bytes written.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lingshu_fast.kernels._aot import AotSpec
from lingshu_fast.kernels._dispatch import use_triton
from lingshu_fast.kernels.vision_geometry import FACTOR, MERGE_SIZE, MERGE_UNIT, PATCH_SIZE, TEMPORAL_PATCH_SIZE

CHANNELS = 3
PATCH_AREA = PATCH_SIZE * PATCH_SIZE  # 196
ROW_WIDTH = CHANNELS * TEMPORAL_PATCH_SIZE * PATCH_AREA  # 1176
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OPENAI_CLIP_MEAN, as transformers
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESCALE_FACTOR = 1 / 255
BLOCK_ROWS = 8  # rows per program: 8 x 256 lanes compiles to <= 72 registers on sm_80 and sm_90a, no spills
BLOCK_K = 256  # lanes covering one channel's 196 pixels (next power of two)
NUM_WARPS, NUM_STAGES = 4, 3  # as launched (3: triton's default); the AOT spec compiles the same


def _clip_stats(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=device)
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=device)
    return mean, std


def normalise_uint8(pixels_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3] -> float32 [..., 3]: transformers' rescale (in float64, then cast) and normalize
    (in float32), in that order, so the results are identical, not merely close."""
    mean, std = _clip_stats(pixels_uint8.device)
    rescaled = (pixels_uint8.to(torch.float64) * RESCALE_FACTOR).to(torch.float32)
    return (rescaled - mean) / std


@functools.lru_cache(maxsize=16)
def _value_table(device: torch.device, out_dtype: torch.dtype) -> torch.Tensor:
    """[3 * 256] out_dtype: the normalised value of each (channel, byte), rounded to out_dtype by torch
    (round-to-nearest-even). The kernel then only copies: no in-kernel cast whose rounding could differ
    between GPU and the interpreter (which truncates fp32 -> bf16)."""
    all_bytes = torch.arange(256, dtype=torch.uint8, device=device)
    table = normalise_uint8(all_bytes[:, None].expand(256, CHANNELS)).t().contiguous().reshape(-1)
    return table.to(out_dtype)


def grid_of_sizes(sizes: torch.Tensor) -> torch.Tensor:
    """(t, h, w) patch grids [n, 3] int64 of smart-resized images of `sizes` [n, 2] (height, width)."""
    heights, widths = sizes[:, 0], sizes[:, 1]
    return torch.stack([torch.ones_like(heights), heights // PATCH_SIZE, widths // PATCH_SIZE], dim=1)


def _layout(flat_uint8: torch.Tensor, sizes: torch.Tensor) -> dict[str, torch.Tensor]:
    """Validate the inputs and derive the per-image metadata (on the host: n is small)."""
    if flat_uint8.dtype != torch.uint8 or flat_uint8.dim() != 1:
        raise ValueError(f"flat_uint8 must be a 1-D uint8 tensor, got {flat_uint8.dtype} {tuple(flat_uint8.shape)}")
    sizes = torch.as_tensor(sizes).to("cpu", torch.int64)
    if sizes.dim() != 2 or sizes.shape[1] != 2 or sizes.shape[0] == 0:
        raise ValueError(f"sizes must be [n >= 1, 2] (height, width), got {tuple(sizes.shape)}")
    heights, widths = sizes[:, 0], sizes[:, 1]
    bad = (heights <= 0) | (widths <= 0) | (heights % FACTOR != 0) | (widths % FACTOR != 0)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"image {i} is {sizes[i].tolist()}: sides must be positive multiples of {FACTOR} (smart_resize first)"
        )
    image_bytes = heights * widths * CHANNELS
    if int(image_bytes.sum()) != flat_uint8.numel():
        raise ValueError(f"flat_uint8 holds {flat_uint8.numel()} bytes but sizes describe {int(image_bytes.sum())}")
    rows = heights * widths // PATCH_AREA
    zero = torch.zeros(1, dtype=torch.int64)
    return {
        "grid_thw": grid_of_sizes(sizes),
        "cu_rows": torch.cat([zero, rows.cumsum(0)]),
        "pixel_offsets": torch.cat([zero, image_bytes.cumsum(0)[:-1]]),
        "widths": widths.contiguous(),  # a column view: the kernel needs unit stride
    }


def window_index(
    image_grid_thw: torch.Tensor,
    window_size_px: int = 112,
    spatial_merge_size: int = MERGE_SIZE,
    patch_size: int = PATCH_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Qwen2.5-VL ViT window permutation, equal to transformers' get_window_index:
    (index [P/4] int64 over 2x2 merge units, cu_window_seqlens [windows + 1] int32 in patches).
    Windows are `window_size_px` square (112 px = 4x4 merge units), row-major per image, cut at the
    right/bottom edges; units inside a window are row-major. Empty windows are dropped."""
    device = image_grid_thw.device
    grid = image_grid_thw.to("cpu", torch.int64)
    side = window_size_px // spatial_merge_size // patch_size  # merge units per window side
    t, units_h, units_w = grid[:, 0], grid[:, 1] // spatial_merge_size, grid[:, 2] // spatial_merge_size
    units = t * units_h * units_w
    windows_h, windows_w = -(-units_h // side), -(-units_w // side)
    windows = t * windows_h * windows_w
    image_of = torch.repeat_interleave(torch.arange(len(grid)), units)
    unit_start = torch.cat([torch.zeros(1, dtype=torch.int64), units.cumsum(0)[:-1]])
    window_start = torch.cat([torch.zeros(1, dtype=torch.int64), windows.cumsum(0)[:-1]])
    local = torch.arange(int(units.sum())) - unit_start[image_of]
    frame_units = (units_h * units_w)[image_of]
    frame, in_frame = local // frame_units, local % frame_units
    row, col = in_frame // units_w[image_of], in_frame % units_w[image_of]
    window_in_image = (frame * windows_h[image_of] + row // side) * windows_w[image_of] + col // side
    window_id = window_start[image_of] + window_in_image
    key = window_id * side * side + (row % side) * side + col % side
    index = torch.argsort(key)
    counts = torch.bincount(window_id, minlength=int(windows.sum()))
    counts = counts[counts > 0]
    merge_unit = spatial_merge_size * spatial_merge_size
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0) * merge_unit])
    return index.to(device), cu.to(device=device, dtype=torch.int32)


def _window_rows(grid_thw: torch.Tensor, window_size_px: int) -> torch.Tensor:
    """Output row r in window order <- natural row index[r // 4] * 4 + r % 4."""
    index, _ = window_index(grid_thw, window_size_px)
    unit = MERGE_UNIT
    return (index[:, None] * unit + torch.arange(unit)).reshape(-1)


def pack_images_reference(
    flat_uint8: torch.Tensor,
    sizes: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.float32,
    window_order: bool = False,
    window_size_px: int = 112,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch normalise + patchify (the CPU path and the test oracle); see the module docstring.

    Patchifies the bytes first (1 B per value moved by the permute), then maps each byte through the
    3x256 table of `normalise_uint8` values, writing both temporal copies by broadcast: ~1.5x faster
    on CPU than transformers' float pipeline, with identical values."""
    layout = _layout(flat_uint8, sizes)
    device = flat_uint8.device
    table = _value_table(device, out_dtype)
    channel_base = torch.arange(CHANNELS, device=device)[:, None] * 256  # table row of each channel
    num_rows = int(layout["cu_rows"][-1])
    out = torch.empty(num_rows, CHANNELS, TEMPORAL_PATCH_SIZE, PATCH_AREA, dtype=out_dtype, device=device)
    starts = zip(layout["pixel_offsets"].tolist(), layout["cu_rows"].tolist())
    for (height, width), (start, row) in zip(torch.as_tensor(sizes).tolist(), starts):
        rows = height * width // PATCH_AREA
        image = flat_uint8[start : start + height * width * CHANNELS]
        blocks = image.view(height // FACTOR, MERGE_SIZE, PATCH_SIZE, width // FACTOR, MERGE_SIZE, PATCH_SIZE, CHANNELS)
        # rows (block_y, block_x, sub_y, sub_x), columns (c, ph, pw)
        patches = blocks.permute(0, 3, 1, 4, 6, 2, 5).reshape(rows, CHANNELS, PATCH_AREA)
        out[row : row + rows] = table[patches.long() + channel_base][:, :, None, :]  # both temporal copies
    pixel_values = out.view(num_rows, ROW_WIDTH)
    if window_order:
        pixel_values = pixel_values[_window_rows(layout["grid_thw"], window_size_px).to(device)]
    return pixel_values, layout["grid_thw"].to(device)


@triton.jit
def _pack_images_kernel(
    pixels_ptr,  # *u8: the concatenated HWC images
    table_ptr,  # *out dtype [3 * 256]: normalised value per (channel, byte)
    out_ptr,  # *fp32 | *bf16 [num_rows, 1176]
    cu_rows_ptr,  # *i64 [num_images + 1]: first natural-order row of each image
    pixel_offsets_ptr,  # *i64 [num_images]: first byte of each image
    widths_ptr,  # *i64 [num_images]: width in pixels
    src_rows_ptr,  # *i64 [num_rows]: natural row of each output row (read only when WINDOW_ORDER)
    num_rows,
    num_images,
    search_steps,  # >= ceil(log2(num_images)): binary-search iterations
    WINDOW_ORDER: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < num_rows
    if WINDOW_ORDER:
        src = tl.load(src_rows_ptr + rows, mask=row_ok, other=0)
    else:
        src = rows
    # image of each row: largest i with cu_rows[i] <= src (invariant cu_rows[lo] <= src < cu_rows[hi])
    lo = tl.zeros([BLOCK_ROWS], dtype=tl.int32)
    hi = tl.zeros([BLOCK_ROWS], dtype=tl.int32) + num_images
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        go_right = tl.load(cu_rows_ptr + mid, mask=row_ok, other=0) <= src
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    local = src - tl.load(cu_rows_ptr + lo, mask=row_ok, other=0)
    width = tl.load(widths_ptr + lo, mask=row_ok, other=28)
    base = tl.load(pixel_offsets_ptr + lo, mask=row_ok, other=0)
    blocks_per_row = width // 28
    block, sub = local // 4, local % 4
    y0 = ((block // blocks_per_row) * 2 + sub // 2) * 14
    x0 = ((block % blocks_per_row) * 2 + sub % 2) * 14
    k = tl.arange(0, BLOCK_K)
    k_ok = k < 196
    pixel_y, pixel_x = y0[:, None] + k[None, :] // 14, x0[:, None] + k[None, :] % 14
    src_offsets = base[:, None] + (pixel_y * width[:, None] + pixel_x) * 3
    mask = row_ok[:, None] & k_ok[None, :]
    out_offsets = rows[:, None] * 1176 + k[None, :]
    for c in tl.static_range(3):
        byte = tl.load(pixels_ptr + src_offsets + c, mask=mask, other=0).to(tl.int32)
        value = tl.load(table_ptr + c * 256 + byte, mask=mask, other=0.0)
        tl.store(out_ptr + out_offsets + c * 392, value, mask=mask)  # temporal copy 0
        tl.store(out_ptr + out_offsets + c * 392 + 196, value, mask=mask)  # temporal copy 1


def _pack_images_triton(
    flat_uint8: torch.Tensor, sizes: torch.Tensor, out_dtype: torch.dtype, window_order: bool, window_size_px: int
) -> tuple[torch.Tensor, torch.Tensor]:
    layout = _layout(flat_uint8, sizes)
    flat_uint8 = flat_uint8.contiguous()  # the kernel indexes bytes with unit stride
    device = flat_uint8.device
    num_images = layout["grid_thw"].shape[0]
    num_rows = int(layout["cu_rows"][-1])
    out = torch.empty(num_rows, ROW_WIDTH, dtype=out_dtype, device=device)
    # one host-to-device copy for all per-image metadata: [cu_rows (n+1) | pixel_offsets (n) | widths (n)]
    meta = torch.cat([layout["cu_rows"], layout["pixel_offsets"], layout["widths"]]).to(device, non_blocking=True)
    cu_rows, pixel_offsets, widths = meta.split([num_images + 1, num_images, num_images])
    # natural order never reads src_rows: any int64 pointer will do
    src_rows = _window_rows(layout["grid_thw"], window_size_px).to(device) if window_order else cu_rows
    grid = (triton.cdiv(num_rows, BLOCK_ROWS),)
    _pack_images_kernel[grid](
        flat_uint8,
        _value_table(device, out_dtype),
        out,
        cu_rows,
        pixel_offsets,
        widths,
        src_rows,
        num_rows,
        num_images,
        max(1, num_images.bit_length()),
        WINDOW_ORDER=window_order,
        BLOCK_ROWS=BLOCK_ROWS,
        BLOCK_K=BLOCK_K,
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )
    return out, layout["grid_thw"].to(device)


def pack_images(
    flat_uint8: torch.Tensor,
    sizes: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.float32,
    window_order: bool = False,
    window_size_px: int = 112,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(flat_uint8 [sum h*w*3] uint8, sizes [n, 2] int64) -> (pixel_values [P, 1176] out_dtype,
    image_grid_thw [n, 3] int64), on flat_uint8's device. Triton or reference per LINGSHU_KERNELS."""
    if out_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    if use_triton(flat_uint8):
        return _pack_images_triton(flat_uint8, sizes, out_dtype, window_order, window_size_px)
    return pack_images_reference(
        flat_uint8, sizes, out_dtype=out_dtype, window_order=window_order, window_size_px=window_size_px
    )


def aot_specs() -> list[AotSpec]:
    """The kernel as launched: fp32 and bf16 outputs, natural and window order (no tl.dot: no wgmma)."""
    specs = []
    for out_type in ("fp32", "bf16"):
        for window_order in (False, True):
            signature = {
                "pixels_ptr": "*u8",
                "table_ptr": f"*{out_type}",
                "out_ptr": f"*{out_type}",
                "cu_rows_ptr": "*i64",
                "pixel_offsets_ptr": "*i64",
                "widths_ptr": "*i64",
                "src_rows_ptr": "*i64",
                "num_rows": "i32",
                "num_images": "i32",
                "search_steps": "i32",
                "WINDOW_ORDER": "constexpr",
                "BLOCK_ROWS": "constexpr",
                "BLOCK_K": "constexpr",
            }
            constexprs = {"WINDOW_ORDER": window_order, "BLOCK_ROWS": BLOCK_ROWS, "BLOCK_K": BLOCK_K}
            specs.append(
                AotSpec(
                    name=f"image_pack[{out_type},window_order={window_order},BLOCK_ROWS={BLOCK_ROWS}]",
                    fn=_pack_images_kernel,
                    signature=signature,
                    constexprs=constexprs,
                    num_warps=NUM_WARPS,
                    num_stages=NUM_STAGES,
                    expects_wgmma=False,
                )
            )
    return specs
