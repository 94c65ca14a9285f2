"""PackedLoader (determinism, resume, DP sharding, bad inputs, images), MicroBatch (shifted labels,
pad_to) and the demo dataset."""
import dataclasses
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from lingshu_fast.config import DataConfig
from lingshu_fast.data.batch import IGNORE_INDEX, MicroBatch
from lingshu_fast.data.demo_data import build_demo_dataset
from lingshu_fast.data.formats import DataError, parse_record
from lingshu_fast.data.images import preprocess
from lingshu_fast.data.loader import PackedLoader
from lingshu_fast.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo_dataset(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def _cfg(demo, **kw):
    # built in the test process unless a test asks for workers (each pool costs a process start here)
    base = dict(train=[str(demo["instruct"])], max_pixels=84 * 84, max_tokens_per_microbatch=160,
                max_length=160, shuffle_window=64, num_workers=0)
    base.update(kw)
    return DataConfig(**base)


def _same(a: MicroBatch, b: MicroBatch) -> bool:
    for f in dataclasses.fields(MicroBatch):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if x is None or y is None or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def test_microbatch_invariants(demo, tok):
    """Per micro-batch: budget respected, cu_seqlens consistent, labels shifted per sample and never
    crossing a boundary, pixel rows == patches of its images, pixel values equal preprocess() of
    the samples' images, text-only segments get 0..n-1 positions."""
    cfg = _cfg(demo)
    loader = PackedLoader(cfg.train, tok, cfg, seed=3, epochs=1)
    seen = []
    for mb in loader:
        T = mb.num_tokens
        cu = mb.cu_seqlens.long()
        assert T <= cfg.max_tokens_per_microbatch and cu[0] == 0 and cu[-1] == T
        assert mb.max_seqlen == int((cu[1:] - cu[:-1]).max()) and mb.num_samples == len(mb.sample_ids)
        assert mb.position_ids.shape == (3, T) and mb.labels.shape == (T,)
        for b, index in enumerate(mb.sample_ids):
            lo, hi = int(cu[b]), int(cu[b + 1])
            assert mb.labels[hi - 1] == IGNORE_INDEX
            seg_ids, seg_labels = mb.input_ids[lo:hi], mb.labels[lo:hi]
            trained = seg_labels[:-1] != IGNORE_INDEX
            assert torch.equal(seg_labels[:-1][trained], seg_ids[1:][trained])
            if not loader.samples[index].images:
                assert torch.equal(mb.position_ids[:, lo:hi], torch.arange(hi - lo).expand(3, -1))
        assert mb.num_label_tokens == int((mb.labels != IGNORE_INDEX).sum()) > 0
        paths = [p for i in mb.sample_ids for p in loader.samples[i].images]
        if paths:
            pv, grid = preprocess(paths, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
            assert torch.equal(mb.pixel_values, pv) and torch.equal(mb.image_grid_thw, grid)
            assert mb.vit_cu_seqlens[-1] == mb.pixel_values.shape[0] == int(grid.prod(1).sum())
            assert int((mb.input_ids == loader.token_ids["image_token_id"]).sum()) == int(grid.prod(1).sum()) // 4
        else:
            assert mb.pixel_values is None and mb.vit_cu_seqlens is None
        seen += mb.sample_ids
    assert sorted(seen) == list(range(len(loader.samples)))  # dp=1: every sample exactly once an epoch
    efficiency = loader.packing_efficiency(0)
    assert efficiency == pytest.approx(loader.lengths.sum() / (len(loader) * cfg.max_tokens_per_microbatch))
    assert efficiency > 0.85  # short demo samples pack tightly; a broken planner falls far below


def test_determinism_and_resume_across_epochs(demo, tok):
    """A resumed loader must yield exactly the micro-batches an uninterrupted one yields (the
    kill-and-resume guarantee), including across an epoch boundary; same seed, same stream (also with
    prefetch threads, also after a resume that discards prefetched work); another seed, another order."""
    cfg = _cfg(demo)
    first = PackedLoader(cfg.train, tok, cfg, seed=5)
    per_epoch = len(first)
    k = per_epoch - 2
    stream = [next(first) for _ in range(k)]
    state = json.loads(json.dumps(first.state_dict()))  # the state must survive a JSON/pickle round trip
    rest = [next(first) for _ in range(5)]  # crosses into epoch 1
    assert first.epoch == 1
    resumed = PackedLoader(cfg.train, tok, cfg, seed=5)
    resumed.load_state_dict(state)
    assert all(_same(a, b) for a, b in zip(rest, [next(resumed) for _ in range(5)]))
    again = PackedLoader(cfg.train, tok, cfg, seed=5)
    assert all(_same(a, next(again)) for a in stream)
    threaded_cfg = dataclasses.replace(cfg, num_workers=2)  # prefetch threads must not change the stream
    threaded = PackedLoader(threaded_cfg.train, tok, threaded_cfg, seed=5)
    assert all(_same(a, next(threaded)) for a in stream)
    threaded.load_state_dict(state)
    assert all(_same(a, next(threaded)) for a in rest)
    threaded.close()
    other = PackedLoader(cfg.train, tok, cfg, seed=6)
    assert [next(other).sample_ids for _ in range(4)] != [mb.sample_ids for mb in stream[:4]]
    with pytest.raises(DataError, match="cannot resume"):
        other.load_state_dict(state)


def test_dp_sharding_disjoint_covering_and_layout_independent(demo, tok):
    """Rank r takes global bins r, r+dp, ...: ranks are disjoint, equal in count, and two ranks'
    k-th micro-batches are global bins 2k, 2k+1 (what the dp=1 run consumes in the same step), so the
    loss curve does not depend on dp. A dp=1 state resumes on dp=2 at the same global position."""
    cfg = _cfg(demo)
    single = PackedLoader(cfg.train, tok, cfg, seed=7, epochs=1)
    ranks = [PackedLoader(cfg.train, tok, cfg, seed=7, dp_rank=r, dp_size=2, epochs=1) for r in range(2)]
    global_ids = [mb.sample_ids for mb in single]
    rank_ids = [[mb.sample_ids for mb in r] for r in ranks]
    assert len(rank_ids[0]) == len(rank_ids[1]) == len(global_ids) // 2
    for k in range(len(rank_ids[0])):
        assert rank_ids[0][k] == global_ids[2 * k] and rank_ids[1][k] == global_ids[2 * k + 1]
    flat = [i for r in rank_ids for mb in r for i in mb]
    assert len(flat) == len(set(flat))
    single2 = PackedLoader(cfg.train, tok, cfg, seed=7)
    for _ in range(4):
        next(single2)
    rank1 = PackedLoader(cfg.train, tok, cfg, seed=7, dp_rank=1, dp_size=2)
    rank1.load_state_dict(single2.state_dict())
    assert next(rank1).sample_ids == global_ids[5]
    records = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}] * 3
    with pytest.raises(DataError, match="data-parallel ranks"):  # at start-up, not at the first step
        PackedLoader(records, tok, DataConfig(max_tokens_per_microbatch=64), dp_rank=0, dp_size=4)


def test_no_packing_is_one_sample_per_microbatch(demo, tok):
    cfg = _cfg(demo, pack=False)
    loader = PackedLoader(cfg.train, tok, cfg, seed=1, epochs=1)
    batches = list(loader)
    assert all(mb.num_samples == 1 and mb.cu_seqlens.tolist() == [0, mb.num_tokens] for mb in batches)
    assert sorted(mb.sample_ids[0] for mb in batches) == list(range(len(loader.samples)))


@pytest.fixture()
def bad_data(tmp_path):
    """One good sample per kind plus one record per bad-input case, in one JSONL."""
    Image.fromarray(np.full((60, 60), 200, np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "garbage.png").write_bytes(b"this is not an image at all")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])  # header fine, pixels cut

    def chat(user, answer, images):
        return json.dumps({"messages": [{"role": "user", "content": user},
                                        {"role": "assistant", "content": answer}], "images": images})
    lines = [chat("<image>fine?", "yes", ["ok.png"]), chat("text only", "fine", []),
             chat("<image>x", "y", ["missing.png"]), chat("<image>x", "y", ["garbage.png"]),
             chat("<image><image>x", "y", ["ok.png"]), chat("x " * 400, "y", []),
             chat("x", " ", []), "{oops", json.dumps({"messages": [{"role": "user", "content": "x"}]}),
             chat("<image>x", "y", ["truncated.png"])]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_each_bad_input_is_counted_or_strict_error(bad_data, tok):
    """Each bad-input case is skipped with its own counted reason (start-up scan), the truncated PNG
    (undetectable from its header) is dropped at build time and counted as runtime corrupt_image; with
    data.strict=true start-up raises ONE error naming every bad line, the truncated one included."""
    cfg = DataConfig(train=[str(bad_data)], max_pixels=56 * 56, max_length=200, max_tokens_per_microbatch=200,
                     pack=False)
    loader = PackedLoader(cfg.train, tok, cfg, seed=0, epochs=1)
    assert {k: v for k, v in loader.skipped_startup.items() if v} == {
        "missing_image": 1, "corrupt_image": 1, "image_count_mismatch": 1, "too_long": 1,
        "empty_assistant": 1, "bad_json": 1, "bad_schema": 1}
    assert len(loader.samples) == 3
    batches = list(loader)
    assert loader.skipped_runtime["corrupt_image"] == 1 and loader.skipped["corrupt_image"] == 2
    assert sorted(i for mb in batches for i in mb.sample_ids) == [0, 1]  # the truncated one dropped
    empty = [mb for mb in batches if mb.num_samples == 0]
    assert len(empty) == 1 and empty[0].num_label_tokens == 0 and len(batches) == 3  # lockstep kept
    strict = dataclasses.replace(cfg, strict=True)
    with pytest.raises(DataError) as info:
        PackedLoader(strict.train, tok, strict, seed=0)
    message = str(info.value)
    for line in (3, 4, 5, 6, 7, 8, 9, 10):
        assert f"{bad_data}:{line}:" in message, line


def test_pad_to_fixed_shape(demo, tok):
    """Pipeline stages need fixed shapes: pad_to adds one pad segment with no labels and pads
    cu_seqlens with empty segments; real tokens are unchanged and errors are clear."""
    cfg = _cfg(demo)
    mb = next(PackedLoader(cfg.train, tok, cfg, seed=2))
    padded = mb.pad_to(200, 8, pad_token_id=tok.pad_token_id)
    T, B = mb.num_tokens, mb.num_samples
    assert padded.num_tokens == 200 and padded.cu_seqlens.shape == (9,) and padded.cu_seqlens.dtype == torch.int32
    assert torch.equal(padded.input_ids[:T], mb.input_ids) and (padded.labels[T:] == IGNORE_INDEX).all()
    assert padded.cu_seqlens.tolist()[: B + 2] == mb.cu_seqlens.tolist() + [200]
    assert padded.cu_seqlens.tolist()[B + 2:] == [200] * (8 - B - 1) and padded.num_label_tokens == mb.num_label_tokens
    assert torch.equal(padded.position_ids[:, T:], torch.arange(200 - T).expand(3, -1))
    with pytest.raises(ValueError, match="max_segments"):
        mb.pad_to(200, B)
    with pytest.raises(ValueError, match="total_tokens"):
        mb.pad_to(T - 1, 8)
    assert mb.to("cpu").pin_memory().num_tokens == T


def test_demo_dataset_deterministic_small_and_valid(tmp_path, demo, tok):
    """The demo must rebuild byte-identically (the demo's losses are compared run to run), stay small
    and fast, and every record must load without a skip (a skip would hide a broken generator)."""
    start = time.perf_counter()
    again = build_demo_dataset(tmp_path / "again")
    assert time.perf_counter() - start < 5.0
    def data_files(root):  # the loaders of this module leave their data indexes beside the JSONL
        return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and ".lfidx" not in p.name)

    files = data_files(demo["images"].parent)
    assert files == data_files(again["images"].parent)
    assert all((demo["images"].parent / f).read_bytes() == (again["images"].parent / f).read_bytes() for f in files)
    assert sum((demo["images"].parent / f).stat().st_size for f in files) < 2_000_000
    assert any(str(f).endswith(".dcm") for f in files) and any(str(f).endswith(".jpg") for f in files)
    for name in ("captions", "captions_varied", "instruct"):
        cfg = DataConfig(train=[str(demo[name])], max_pixels=84 * 84, max_tokens_per_microbatch=256,
                         max_length=256, strict=True)
        assert len(PackedLoader(cfg.train, tok, cfg).samples) > 20
    for line in demo["rl"].read_text().splitlines():
        rec = json.loads(line)
        s = parse_record(rec, base_dir=demo["rl"].parent, require_assistant=False)
        assert s.extra["answer"] in ("A", "B", "C", "D", "yes", "no")
    for line in demo["eval"].read_text().splitlines():
        rec = json.loads(line)
        assert rec["answer"] in "ABCD"[: len(rec["options"])] and all((demo["eval"].parent / p).is_file() for p in rec["images"])


def test_uint8_image_transfer_packs_on_the_device_to_the_same_pixels(demo, tok, monkeypatch):
    """Pins data.image_transfer=uint8: the loader ships the resized bytes (1 byte per value, 1/8 of
    the float32 patches' bytes), `to(device)` packs them into exactly the pixel values of the
    host path (reference and Triton-interpreted kernels alike: both are exact byte -> table maps),
    pad_to keeps the bytes, packing in bf16 equals casting the float32 pixels, and `auto` on a host
    without CUDA packs on the host."""
    host = PackedLoader([str(demo["instruct"])], tok, _cfg(demo, image_transfer="float32"), seed=5, epochs=1)
    ship = PackedLoader([str(demo["instruct"])], tok, _cfg(demo, image_transfer="uint8"), seed=5, epochs=1)
    auto = PackedLoader([str(demo["instruct"])], tok, _cfg(demo), seed=5, epochs=1)
    assert not auto._ship_uint8 or torch.cuda.is_available()
    with_images = 0
    for a, b in zip(host, ship):
        if a.pixel_values is None:
            assert b.image_uint8 is None and b.pixel_values is None
            continue
        with_images, last = with_images + 1, b
        assert b.pixel_values is None and b.image_uint8.dtype == torch.uint8
        assert b.image_uint8.numel() * 8 == a.pixel_values.numel() * a.pixel_values.element_size()
        for kernels in ("torch", "triton"):
            monkeypatch.setenv("LINGSHU_KERNELS", kernels)
            moved = b.pad_to(b.num_tokens + 3, int(b.cu_seqlens.numel()) + 1).to("cpu")
            assert moved.image_uint8 is None and torch.equal(moved.pixel_values, a.pixel_values)
            assert torch.equal(moved.image_grid_thw, a.image_grid_thw)
            # packed straight in the model's bf16: the one rounding the ViT's cast would make
            half = b.to("cpu", pixel_dtype=torch.bfloat16).pixel_values
            assert half.dtype == torch.bfloat16 and torch.equal(half, a.pixel_values.to(torch.bfloat16))
    assert with_images > 0
    bad = dataclasses.replace(last, image_grid_thw=last.image_grid_thw + 1)
    with pytest.raises(ValueError, match="differ from the batch's image_grid_thw"):
        bad.to("cpu")
