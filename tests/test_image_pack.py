"""kernels/image_pack.py: normalise + patchify of resized uint8 images, reference and Triton kernel.

Tolerance is exactly zero throughout: the reference performs transformers' operations in the same
precisions (rescale in float64 then cast, normalise in float32, both IEEE-exact elementwise ops), and
the kernel only copies values from a 3x256 table built by that same code (rounded to bf16 by torch),
so any difference is a layout or indexing bug, never rounding. The kernel runs under
TRITON_INTERPRET=1 (tests/conftest.py) with LINGSHU_KERNELS=triton.
"""
import pytest
import torch

from lingshu_fast.kernels import image_pack
from lingshu_fast.kernels.image_pack import aot_specs, pack_images, pack_images_reference, window_index


def _random_images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    flat = torch.randint(0, 256, (sum(h * w * 3 for h, w in sizes),), dtype=torch.uint8, generator=g)
    return flat, torch.tensor(sizes, dtype=torch.int64)


def _transformers_processor(min_pixels, max_pixels):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)


def _transformers_window_index(grid_thw):
    """transformers >= 5.2x has a free function; older versions a method on the vision model."""
    try:
        from transformers.vision_utils import get_vision_window_index

        return get_vision_window_index(grid_thw, spatial_merge_size=2, window_size=112, patch_size=14)
    except ImportError:
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        config = Qwen2_5_VLVisionConfig(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16)
        return Qwen2_5_VisionTransformerPretrainedModel(config).get_window_index(grid_thw)


SIZE_SETS = {
    "single_smallest": [(28, 28)],
    "single_odd_aspect": [(28, 532)],
    "mixed": [(56, 84), (196, 28), (28, 28), (140, 112), (84, 252)],
}


def test_reference_equals_transformers_processor():
    """Pins the layout inside a 1176-row (channel, temporal, ph, pw), the 2x2-merge row order and the
    rescale/normalise arithmetic against Qwen2VLImageProcessorPil on already-resized images (sides are
    multiples of 28 inside the budget, so its bicubic resize is the identity). Exact equality."""
    sizes = SIZE_SETS["mixed"]
    flat, sizes_t = _random_images(sizes, seed=1)
    images, start = [], 0
    for h, w in sizes:
        images.append(flat[start : start + h * w * 3].view(h, w, 3).numpy())
        start += h * w * 3
    expected = _transformers_processor(28 * 28, 28 * 28 * 4096)(images, return_tensors="pt")
    pixel_values, grid_thw = pack_images_reference(flat, sizes_t)
    assert pixel_values.dtype == torch.float32 and pixel_values.shape == (sum(h * w for h, w in sizes) // 196, 1176)
    assert torch.equal(grid_thw, expected["image_grid_thw"])
    assert torch.equal(pixel_values, expected["pixel_values"])


def test_temporal_copies_identical_and_channel_major():
    """The two temporal copies in a row are equal, and channel c occupies columns [392c, 392c+392)."""
    flat, sizes = _random_images([(28, 56)], seed=2)
    pixel_values, _ = pack_images_reference(flat, sizes)
    rows = pixel_values.view(-1, 3, 2, 196)
    assert torch.equal(rows[:, :, 0], rows[:, :, 1])
    image = flat.view(28, 56, 3)
    first_patch = image_pack.normalise_uint8(image[:14, :14])  # row 0 = top-left 14x14 patch
    assert torch.equal(rows[0, :, 0], first_patch.permute(2, 0, 1).reshape(3, 196))


@pytest.mark.parametrize("case", sorted(SIZE_SETS))
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window_order", [False, True])
def test_triton_equals_reference(monkeypatch, case, out_dtype, window_order):
    """The Triton kernel (interpreted) against the reference: single images, an extreme aspect ratio and
    images of different widths in one launch (a row block straddles images; the image lookup is a
    binary search over cu_rows). bf16 too is exact: both round the same fp32 value with torch."""
    monkeypatch.setenv("LINGSHU_KERNELS", "triton")
    flat, sizes = _random_images(SIZE_SETS[case], seed=3)
    got, got_grid = pack_images(flat, sizes, out_dtype=out_dtype, window_order=window_order)
    expected, expected_grid = pack_images_reference(flat, sizes, out_dtype=out_dtype, window_order=window_order)
    assert got.dtype == out_dtype and got.shape == expected.shape
    assert torch.equal(got, expected)
    assert torch.equal(got_grid, expected_grid)


def test_dispatch_torch_mode_uses_reference(monkeypatch):
    """LINGSHU_KERNELS=torch gives the reference (same values) without touching Triton."""
    monkeypatch.setenv("LINGSHU_KERNELS", "torch")
    flat, sizes = _random_images([(28, 28), (56, 28)], seed=4)
    monkeypatch.setattr(image_pack, "_pack_images_triton", lambda *a, **k: pytest.fail("Triton path taken"))
    got, _ = pack_images(flat, sizes)
    assert torch.equal(got, pack_images_reference(flat, sizes)[0])


@pytest.mark.parametrize(
    "grids",
    [
        [(1, 2, 2)],
        [(1, 16, 16)],  # exactly 2x2 windows: transformers pads a whole empty window row/column
        [(1, 10, 22), (1, 4, 6)],
        [(1, 34, 8), (1, 2, 40), (1, 18, 18)],
        [(2, 10, 12)],  # t > 1 (video-like): windows repeat per frame
    ],
)
def test_window_index_equals_transformers(grids):
    """window_index == transformers' get_window_index, index (int64) and cu_window_seqlens (int32),
    including edge windows cut by the image border and grids that are exact multiples of the window."""
    grid_thw = torch.tensor(grids, dtype=torch.int64)
    expected_index, expected_cu = _transformers_window_index(grid_thw)
    index, cu = window_index(grid_thw)
    assert torch.equal(index, expected_index.to(index.device))
    assert cu.dtype == expected_cu.dtype and torch.equal(cu, expected_cu)


def test_window_index_random_grids_equal_transformers():
    """Random mixes of image grids (even sides, as the merger requires)."""
    g = torch.Generator().manual_seed(5)
    for _ in range(40):
        n = int(torch.randint(1, 5, (1,), generator=g))
        grid_thw = torch.cat([torch.ones(n, 1, dtype=torch.int64), torch.randint(1, 24, (n, 2), generator=g) * 2], 1)
        expected_index, expected_cu = _transformers_window_index(grid_thw)
        index, cu = window_index(grid_thw)
        assert torch.equal(index, expected_index) and torch.equal(cu, expected_cu), grid_thw.tolist()


def test_window_order_is_reference_gathered_by_window_index():
    """window_order=True rows == natural rows permuted in 2x2 merge units by window_index, which is
    what transformers' permute_input_for_window_attn does after the (row-wise) patch embedding."""
    flat, sizes = _random_images([(252, 140), (84, 28)], seed=6)
    natural, grid_thw = pack_images_reference(flat, sizes)
    windowed, _ = pack_images_reference(flat, sizes, window_order=True)
    index, _ = _transformers_window_index(grid_thw)
    assert torch.equal(windowed, natural.view(-1, 4, 1176)[index].view(-1, 1176))
    assert not torch.equal(windowed, natural)  # a 9x5-unit image has more than one window


@pytest.mark.parametrize(
    "sizes, numel_delta, message",
    [
        ([(28, 30)], 0, "multiples of 28"),
        ([(0, 28)], 0, "multiples of 28"),
        ([(28, 28)], -1, "bytes"),
    ],
)
def test_bad_inputs_are_clear_errors(sizes, numel_delta, message):
    numel = sum(h * w * 3 for h, w in sizes) + numel_delta
    flat = torch.zeros(numel, dtype=torch.uint8)
    with pytest.raises(ValueError, match=message):
        pack_images(flat, torch.tensor(sizes))
    with pytest.raises(ValueError, match="uint8"):
        pack_images(flat.float(), torch.tensor(sizes))


def test_aot_specs_match_kernel_signature():
    """CI's AOT compile relies on the spec naming every kernel argument: fp32 and bf16, both orders."""
    specs = aot_specs()
    arg_names = list(image_pack._pack_images_kernel.arg_names)
    assert len(specs) == 4 and {s.signature["out_ptr"] for s in specs} == {"*fp32", "*bf16"}
    for spec in specs:
        assert list(spec.signature) == arg_names
        assert spec.signature["table_ptr"] == spec.signature["out_ptr"] and not spec.expects_wgmma
        assert set(spec.constexprs) == {n for n, t in spec.signature.items() if t == "constexpr"}

