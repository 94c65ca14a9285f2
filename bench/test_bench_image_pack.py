"""Image packing: normalise + patchify of smart-resized uint8 images, side by side.

Providers on the same already-resized batch:
- lingshu: `pack_images` (the Triton kernel on CUDA, the torch reference on CPU);
- reference: `pack_images_reference` forced (plain torch, one pass per image);
- transformers: Qwen2VLImageProcessorPil(do_resize=False), its numpy rescale/normalize/patchify (CPU
  only: it is a numpy pipeline).
And end to end on CPU (load + bicubic resize + pack): `preprocess` vs the transformers processor.
Batch: 64 mixed-size images resized within transformers' default budget (28*28*1280 px) on CUDA;
16 images within 28*28*256 px on CPU, to keep the run short.
Figures in extra_info: bytes moved (uint8 read + output written), GB/s, and on CUDA the fraction of
the bandwidth of a device-to-device copy of the output (the practical HBM ceiling; the issue asks
for >= 80% of HBM bandwidth). Run: `pytest bench/test_bench_image_pack.py --benchmark`.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lingshu_fast.data.images import concat_uint8, preprocess, smart_resize
from lingshu_fast.kernels.image_pack import pack_images, pack_images_reference

ON_CUDA = torch.cuda.is_available()
NUM_IMAGES, MAX_PIXELS = (64, 28 * 28 * 1280) if ON_CUDA else (16, 28 * 28 * 256)
MIN_PIXELS = 56 * 56


def _raw_images(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sides = rng.integers(200, 1400 if ON_CUDA else 700, size=(NUM_IMAGES, 2))
    return [rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8) for h, w in sides]


def _resized_batch(seed: int = 0) -> list[np.ndarray]:
    """Resized images without paying for bicubic on random data: a random image of the target size."""
    rng = np.random.default_rng(seed + 1)
    out = []
    for image in _raw_images(seed):
        h, w = smart_resize(image.shape[0], image.shape[1], 28, MIN_PIXELS, MAX_PIXELS)
        out.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return out


def _sync():
    if ON_CUDA:
        torch.cuda.synchronize()


def _record(info: dict, flat: torch.Tensor, rows: int, out_dtype: torch.dtype, seconds: float | None):
    moved = flat.numel() + rows * 1176 * torch.finfo(out_dtype).bits // 8
    info.update(num_images=NUM_IMAGES, max_pixels=MAX_PIXELS, rows=rows, bytes_moved=moved, out_dtype=str(out_dtype))
    if seconds:
        info["gb_per_s"] = round(moved / seconds / 1e9, 2)


def _copy_gb_per_s(numel_bytes: int) -> float:
    """Device-to-device copy bandwidth (read + write) on a buffer the size of the output."""
    src = torch.empty(numel_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * numel_bytes * 20 / (start.elapsed_time(end) / 1e3) / 1e9


@pytest.mark.benchmark
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("provider", ["lingshu", "reference", "transformers"])
def test_bench_pack(benchmark, bench_info, provider, out_dtype):
    resized = _resized_batch()
    device = "cuda" if ON_CUDA else "cpu"
    flat, sizes = concat_uint8(resized)
    flat = flat.to(device)
    if provider == "transformers":
        if ON_CUDA or out_dtype != torch.float32:
            pytest.skip("transformers' processor is a numpy (CPU, fp32) pipeline")
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        processor = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)

        def run():
            return processor(resized, do_resize=False, return_tensors="pt")["pixel_values"]
    else:
        fn = pack_images if provider == "lingshu" else pack_images_reference

        def run():
            out = fn(flat, sizes, out_dtype=out_dtype)[0]
            _sync()
            return out

    expected = pack_images_reference(flat, sizes, out_dtype=out_dtype)[0]
    got = run()
    assert torch.equal(got.to(expected.device, expected.dtype), expected)  # same figures, or no figures
    benchmark(run)
    _record(bench_info, flat, expected.shape[0], out_dtype, benchmark.stats.stats.median if benchmark.stats else None)
    bench_info["provider"] = provider
    if ON_CUDA and provider == "lingshu" and "gb_per_s" in bench_info:
        copy_gb_per_s = _copy_gb_per_s(bench_info["bytes_moved"] // 2)
        bench_info["copy_gb_per_s"] = round(copy_gb_per_s, 1)
        bench_info["fraction_of_copy_bandwidth"] = round(bench_info["gb_per_s"] / copy_gb_per_s, 3)


@pytest.mark.benchmark
@pytest.mark.parametrize("provider", ["lingshu", "transformers"])
def test_bench_preprocess_end_to_end_cpu(benchmark, bench_info, provider):
    """The loader's CPU cost per batch: RGB conversion + smart-resize (PIL bicubic) + pack to fp32."""
    images = _raw_images(seed=3)[:8]
    if provider == "transformers":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        processor = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)

        def run():
            return processor(images, return_tensors="pt")["pixel_values"]
    else:

        def run():
            return preprocess(images, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)[0]

    benchmark(run)
    bench_info.update(provider=provider, num_images=len(images), max_pixels=MAX_PIXELS, end_to_end_device="cpu")
