"""M-RoPE position ids (lingshu_fast.data.rope) against transformers' Qwen2_5_VLModel.get_rope_index.

Position ids are integers: every comparison is exact. transformers is the oracle for the batched API;
the numpy path is the oracle for the native one.
"""
import numpy as np
import pytest
import torch

from lingshu_fast.data import rope
from lingshu_fast.data.packing import load_native

IMG, VSTART, VEND, VIDEO = 151655, 151652, 151653, 151656
MERGE = 2
BACKENDS = ["numpy"] + (["native"] if load_native("auto") is not None else [])


@pytest.fixture(scope="module")
def hf_model():
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    config = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=151700,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
        ),
        vision_config=dict(
            depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
            spatial_merge_size=MERGE, fullatt_block_indexes=[0],
        ),
        image_token_id=IMG, vision_start_token_id=VSTART, vision_end_token_id=VEND,
    )
    return Qwen2_5_VLModel(config).eval()


def make_sample(rng, layout):
    """Token ids from a layout like ["t3", (1, 4, 6), "t2"]: text runs and images (grid t, h, w)."""
    ids, grids = [], []
    for part in layout:
        if isinstance(part, str):
            ids += rng.integers(10, 1000, int(part[1:])).tolist()
        else:
            t, h, w = part
            ids += [VSTART] + [IMG] * (t * h * w // MERGE**2) + [VEND]
            grids.append(part)
    return np.array(ids, np.int64), np.array(grids, np.int64).reshape(-1, 3)


LAYOUTS = [
    ["t7"],  # text only
    [(1, 4, 6), "t5"],  # image at the start (after vision-start)
    ["t3", (1, 2, 2), "t4", (1, 6, 4), "t1", (1, 8, 2)],  # several images, image at the end
    ["t2", (1, 4, 4), (1, 2, 6), "t3"],  # back-to-back images
    ["t1", (2, 4, 4), "t2"],  # t > 1 (the temporal axis advances, the text does not)
]


def hf_rope(model, input_ids, grids, attention_mask=None):
    return model.get_rope_index(
        input_ids, (input_ids == IMG).int(), image_grid_thw=grids, attention_mask=attention_mask
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=range(len(LAYOUTS)))
def test_single_sample_matches_transformers(hf_model, layout, backend):
    """Pins the text-resumes-at-max(h, w) rule and row-major (t, h, w) order of image positions."""
    ids, grids = make_sample(np.random.default_rng(0), layout)
    ours = rope.sample_position_ids(ids, grids, image_token_id=IMG, vision_start_token_id=VSTART, backend=backend)
    ref, _ = hf_rope(hf_model, torch.from_numpy(ids)[None], torch.from_numpy(grids))
    np.testing.assert_array_equal(ours, ref[:, 0].numpy())
    assert ours.dtype == np.int64 and ours.shape == (3, ids.shape[0])


@pytest.mark.parametrize("padding_side", ["right", "left", None])
def test_batched_get_rope_index_matches_transformers(hf_model, padding_side):
    """Batch with padding: pins which grids belong to which sample and that padded slots stay 0."""
    rng = np.random.default_rng(1)
    samples = [make_sample(rng, layout) for layout in LAYOUTS]
    if padding_side is None:  # no attention mask: every sample has the same length
        samples = [make_sample(rng, ["t2", (1, 2, 4), "t3"]), make_sample(rng, ["t4", (1, 4, 2), "t1"])]
    seq_len = max(s[0].shape[0] for s in samples)
    input_ids = torch.zeros(len(samples), seq_len, dtype=torch.long)
    mask = torch.zeros(len(samples), seq_len, dtype=torch.long)
    for b, (ids, _) in enumerate(samples):
        span = slice(0, len(ids)) if padding_side != "left" else slice(seq_len - len(ids), seq_len)
        input_ids[b, span] = torch.from_numpy(ids)
        mask[b, span] = 1
    grids = torch.from_numpy(np.concatenate([g for _, g in samples]))
    attention_mask = None if padding_side is None else mask
    ours = rope.get_rope_index(
        input_ids, grids, attention_mask, image_token_id=IMG, vision_start_token_id=VSTART, spatial_merge_size=MERGE
    )
    ref = hf_rope(hf_model, input_ids, grids, attention_mask)
    torch.testing.assert_close(ours[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(ours[1], ref[1], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_restarts_each_sample_at_zero(backend):
    """Packed varlen training: each sample's ids start at 0 and equal its stand-alone ids."""
    rng = np.random.default_rng(2)
    samples = [make_sample(rng, layout) for layout in LAYOUTS]
    per_sample = [
        rope.sample_position_ids(ids, g, image_token_id=IMG, vision_start_token_id=VSTART, backend=backend)
        for ids, g in samples
    ]
    packed = rope.packed_position_ids(per_sample)
    starts = np.cumsum([0] + [ids.shape[0] for ids, _ in samples])
    assert packed.shape == (3, starts[-1])
    for (ids, _), p, s in zip(samples, per_sample, starts):
        np.testing.assert_array_equal(packed[:, s:s + ids.shape[0]], p)
        assert (packed[:, s] == 0).all()
    assert rope.packed_position_ids([]).shape == (3, 0)


def test_native_equals_numpy_on_random_samples():
    """The native builder must be a drop-in for the numpy one on many random layouts."""
    if "native" not in BACKENDS:
        pytest.skip("lingshu_fast._C not built")
    rng = np.random.default_rng(3)
    for _ in range(200):
        layout = []
        for _ in range(rng.integers(1, 6)):
            if rng.random() < 0.5:
                layout.append(f"t{rng.integers(0, 6)}")
            else:
                layout.append((int(rng.integers(1, 3)), 2 * int(rng.integers(1, 5)), 2 * int(rng.integers(1, 5))))
        ids, grids = make_sample(rng, layout)
        kwargs = dict(image_token_id=IMG, vision_start_token_id=VSTART)
        np.testing.assert_array_equal(
            rope.sample_position_ids(ids, grids, backend="numpy", **kwargs),
            rope.sample_position_ids(ids, grids, backend="native", **kwargs),
        )


@pytest.mark.parametrize("backend", BACKENDS)
def test_mismatched_placeholders_are_clear_errors(backend):
    """A placeholder count that disagrees with image_grid_thw must be a ValueError, never wrong ids."""
    ids, grids = make_sample(np.random.default_rng(4), ["t2", (1, 4, 4), "t2"])
    kwargs = dict(image_token_id=IMG, vision_start_token_id=VSTART, backend=backend)
    with pytest.raises(ValueError, match="placeholder"):
        rope.sample_position_ids(np.delete(ids, 4), grids, **kwargs)
    with pytest.raises(ValueError, match="placeholder"):
        rope.sample_position_ids(ids, np.concatenate([grids, grids]), **kwargs)
    with pytest.raises(ValueError, match="placeholder"):
        rope.sample_position_ids(ids, None, **kwargs)
    with pytest.raises(ValueError, match="multiples"):
        rope.sample_position_ids(ids, np.array([[1, 3, 4]]), **kwargs)
    split = ids.copy()
    split[5] = 7  # one hole in the image's run, plus one stray placeholder later on
    split[-1] = IMG
    with pytest.raises(ValueError, match="contiguous"):
        rope.sample_position_ids(split, grids, **kwargs)
    no_start = ids.copy()
    no_start[2] = 7  # the vision-start token before the image
    with pytest.raises(ValueError, match="vision-start"):
        rope.sample_position_ids(no_start, grids, **kwargs)


def test_video_and_bad_backend_are_refused():
    ids = np.array([1, VSTART, VIDEO, VEND], np.int64)
    with pytest.raises(NotImplementedError, match="video"):
        rope.sample_position_ids(ids, None, image_token_id=IMG, vision_start_token_id=VSTART, video_token_id=VIDEO)
    with pytest.raises(ValueError, match="backend"):
        rope.sample_position_ids(ids, None, image_token_id=IMG, vision_start_token_id=VSTART, backend="cuda")


def test_batched_grid_count_mismatch_is_a_clear_error():
    """Grids are consumed across the batch in order: a left-over or missing grid must not shift
    every later sample's images silently."""
    ids, grids = make_sample(np.random.default_rng(5), ["t2", (1, 4, 4), "t2"])
    batch = torch.from_numpy(np.stack([ids, ids]))
    kwargs = dict(image_token_id=IMG, vision_start_token_id=VSTART)
    with pytest.raises(ValueError, match="uses only 2"):
        rope.get_rope_index(batch, torch.from_numpy(np.concatenate([grids] * 3)), **kwargs)
    with pytest.raises(ValueError, match="sample 1"):
        rope.get_rope_index(batch, torch.from_numpy(grids), **kwargs)
