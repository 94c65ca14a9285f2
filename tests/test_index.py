"""The data index (data/index.py, data/scan.py, csrc/jsonl.cpp): the native scanner agrees with
formats.py line for line, the index is built once and rebuilt when stale, processes racing on one
file build it once, and the vectorised smart_resize equals the scalar rule."""
import json
import logging
import multiprocessing
import os
import random
import time

import numpy as np
import pytest
from PIL import Image

from lingshu_fast.config import DataConfig
from lingshu_fast.data import images as img
from lingshu_fast.data.dataset import open_parts, sample_lengths
from lingshu_fast.data.packing import load_native
from lingshu_fast.data.scan import ScanSpec, build_file
from lingshu_fast.data.template import ChatTemplate
from lingshu_fast.data.tokenizer import load_tokenizer

NATIVE = load_native("auto") is not None and hasattr(load_native("auto"), "scan_jsonl")
needs_native = pytest.mark.skipif(not NATIVE, reason="lingshu_fast._C not built")


@pytest.fixture(scope="module")
def template():
    return ChatTemplate(load_tokenizer("tiny"))


def _chat(user="<image>what?", reply="a lesion", **extra):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}], **extra}


TRICKY = [
    _chat(images=["a.png"]), _chat("no image", "x"), _chat(images="a.png"), _chat(images=[{"path": "a.png"}]),
    _chat(images=[{"path": "a.png", "w": 1}]), _chat(images=[{"nopath": 1}]), _chat(images=[3]), _chat(images=None),
    _chat("x", "y", images=None, system="Be brief."), _chat("x", "y", system=3),
    {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                  {"role": "assistant", "content": "a"}], "system": "ignored"},
    {"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "late"},
                  {"role": "assistant", "content": "a"}]},
    {"conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}], "images": ["a.png"]},
    {"conversations": [{"from": "doctor", "value": "q"}, {"from": "gpt", "value": "a"}]},
    {"conversations": [{"from": "system", "value": "s"}, {"from": "user", "value": "q"}, {"from": "assistant", "value": "a"}]},
    {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "q"}]},
                  {"role": "assistant", "content": "a"}]},
    {"messages": [{"role": "user", "content": "q", "from": 3}, {"role": "assistant", "content": "a"}]},
    {"messages": [], "images": []}, {"messages": None}, {"messages": [{"role": "user", "content": "q"}]},
    _chat("q", "   \n\t"), _chat("q", "\u3000"), _chat("q", "\u00e9\u4e2d"), _chat("<image><image>", "a", images=["a.png"]),
    _chat("q <|image_pad|>", "a"), _chat("<image> <|image_pad|>", "a", images=["a.png"]),
    _chat("q\n\"quoted\" \\ back / slash \u2028 \U0001F600 tab\t", "multi\nline"),
    _chat("q", "a", answer_extra={"deep": [[[[{"x": [1, 2.5e-3, -0, True, False, None]}]]]]}),
    {"image": "a.png", "caption": "a grey square"}, {"image": "a.png", "caption": "c", "prompt": "Describe:"},
    {"image": "a.png", "caption": "c", "prompt": 3}, {"image": "a.png", "caption": ""}, {"image": 3, "caption": "c"},
    {"image": "a.png", "caption": "c <image>"}, {"caption": "c"}, {"text": "hello"}, [1, 2], "just a string", 3,
    _chat(images=["../outside.png"]), _chat(images=["/abs/outside.png"]), _chat(images=["~/home.png"]),
    _chat(images=["missing.png"]), _chat(images=["garbage.png"]), _chat(images=["wide.png"]),
    _chat("q", "a", answer="B"), {**_chat("<image>q", "ref", images=["a.png"]), "answer": "yes"},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<image>"}], "images": ["a.png"],
     "answer": "x"},
    {"messages": [{"role": "assistant", "content": "only"}], "answer": "x"},
    {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "ref"}], "answer": 1},
    {"image": "a.png", "caption": "ref", "answer": "c"}, {"image": "a.png", "caption": "ref", "answer": 2},
]
RAW_LINES = [
    b"", b"   \t\r", b"\x0c", b"\xc2\xa0", b"{oops", b'{"messages": [1,]}', b'{"a": NaN, ' + json.dumps(_chat())[1:].encode(),
    b'{"a": 01, ' + json.dumps(_chat())[1:].encode(), b'{"a": 1.}', b'{"a": -}', b"\xff\xfe bad bytes",
    b'{"messages": [{"role": "user", "content": "q\xed\xa0\x80"}, {"role": "assistant", "content": "a"}]}',
    b'{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "a"}]}',
    b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}, {"role": "assistant", "content": "a"}]}',
    b'{"messages": [{"role": "user", "content": "raw\ttab"}, {"role": "assistant", "content": "a"}]}',
    b'{"messages": [{"role": "user", "content": "\\x"}, {"role": "assistant", "content": "a"}]}',
    json.dumps(_chat()).encode() + b" trailing", json.dumps(_chat()).encode() + b" \r",
    b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "messages": []}',
]


def _write_images(folder):
    Image.fromarray(np.full((60, 40), 200, np.uint8)).save(folder / "a.png")
    Image.fromarray(np.zeros((4, 1000), np.uint8)).save(folder / "wide.png")
    (folder / "garbage.png").write_bytes(b"not an image")
    (folder.parent / "outside.png").write_bytes((folder / "a.png").read_bytes())


def _tricky_file(folder, seed=None):
    lines = [json.dumps(r, ensure_ascii=k % 2 == 0).encode() for k, r in enumerate(TRICKY)] + RAW_LINES
    if seed is not None:  # fuzz: random byte edits of the good lines
        rng = random.Random(seed)
        for _ in range(300):
            line = bytearray(rng.choice(lines[:30]))
            for _ in range(rng.randint(1, 3)):
                at = rng.randrange(len(line))
                op = rng.random()
                if op < 0.4:
                    line[at] = rng.choice(b'{}[]",:\\ \t\nax0\xc3\xa9\xff')
                elif op < 0.7:
                    del line[at]
                else:
                    line.insert(at, rng.choice(b'{}[]",:\\ \t\nax0\xc3\xa9'))
            lines.append(bytes(line))
    path = folder / "tricky.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")
    return path


def _same_index(a, b):
    assert a[0]["num_records"] == b[0]["num_records"] and a[0]["bad_counts"] == b[0]["bad_counts"]
    for name in a[1]:
        assert np.array_equal(a[1][name], b[1][name]), name


@needs_native
@pytest.mark.parametrize("mode", ["train", "prompt"])
@pytest.mark.parametrize("confine", [False, True])
def test_native_scanner_agrees_with_python(tmp_path, template, mode, confine):
    """The native scanner accepts a line only when Python would make the same record of it (same
    text, same images): every array and every bad record's line, reason and message are identical,
    over tricky records (part lists, ShareGPT, escapes, surrogates, non-UTF-8, BOM, bad JSON, every
    schema error) in both record modes. A divergence here would be a silent training-data change."""
    folder = tmp_path / "data"
    folder.mkdir()
    _write_images(folder)
    path = _tricky_file(folder)
    native = build_file(path, ScanSpec(template, mode=mode, confine=confine, image_root=str(folder) if confine else None,
                                       backend="native"), False)
    python = build_file(path, ScanSpec(template, mode=mode, confine=confine, image_root=str(folder) if confine else None,
                                       backend="python"), False)
    assert native[0]["scanner"] == "native" and python[0]["scanner"] == "python"
    _same_index(native, python)
    assert native[0]["num_records"] >= (12 if mode == "train" else 4) and sum(native[0]["bad_counts"].values()) >= 30


@needs_native
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_native_scanner_agrees_with_python_on_fuzzed_lines(tmp_path, template, seed):
    """Random byte edits of valid records (broken syntax, stray escapes, invalid UTF-8): whatever
    the scanner accepts must be exactly what Python accepts."""
    folder = tmp_path / "data"
    folder.mkdir()
    _write_images(folder)
    path = _tricky_file(folder, seed=seed)
    _same_index(build_file(path, ScanSpec(template, backend="native"), False),
                build_file(path, ScanSpec(template, backend="python"), False))


def test_lengths_from_the_index_equal_the_rendered_samples(tmp_path, template):
    """Packing relies on the index's lengths: text tokens + image tokens from header sizes must
    equal the length of the sample as the template renders it with its images' grids."""
    folder = tmp_path / "data"
    folder.mkdir()
    _write_images(folder)
    Image.fromarray(np.zeros((333, 517, 3), np.uint8)).save(folder / "b.jpg")
    records = [_chat(images=["a.png"]), _chat("<image> and <image>", "two", images=["b.jpg", "a.png"]), _chat("t", "u")]
    path = folder / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    cfg = DataConfig(min_pixels=56 * 56, max_pixels=200 * 28 * 28)
    part = open_parts([path], template, cfg)[0]
    lengths = sample_lengths(part, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    for k in range(part.num_records):
        sample = part.read_sample(k)
        grids = [img.grid_thw(*img.read_image_size(p), min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
                 for p in sample.images]
        ids, _ = template.render(sample.messages, [t * h * w // 4 for t, h, w in grids])
        assert len(ids) == lengths[k]


def test_vectorised_smart_resize_equals_the_scalar_rule():
    """smart_resize_many is what the start-up uses for every image: it must equal smart_resize
    (itself pinned to transformers) entry for entry, rounding ties and all."""
    rng = np.random.default_rng(0)
    h = rng.integers(1, 6000, 20000)
    w = np.clip((h * rng.uniform(1 / 150, 150, h.size)).astype(np.int64), 1, 40000)
    edges = np.array([[14, 14], [28, 28], [42, 42], [56, 56], [1, 200], [200, 1], [70, 98], [2, 3], [1260, 2520]])
    h, w = np.concatenate([h, edges[:, 0]]), np.concatenate([w, edges[:, 1]])
    ok = np.maximum(h, w) / np.minimum(h, w) <= 200
    h, w = h[ok], w[ok]
    for min_pixels, max_pixels in [(56 * 56, 28 * 28 * 1280), (3136, 12544), (4 * 28 * 28, 16384 * 28 * 28)]:
        rh, rw = img.smart_resize_many(h, w, min_pixels=min_pixels, max_pixels=max_pixels)
        expected = np.asarray([img.smart_resize(int(a), int(b), 28, min_pixels, max_pixels) for a, b in zip(h, w)])
        assert np.array_equal(np.stack([rh, rw], 1), expected)


def _count_builds(caplog):
    return sum("indexed " in r.getMessage() for r in caplog.records)


def test_index_is_built_once_and_rebuilt_when_stale(tmp_path, template, caplog):
    """A fresh index is mapped, not rebuilt; any change to the data file (content, size, or only
    its mtime) and any change of the settings it depends on gives a rebuild, never a stale read;
    data.strict needs an index built with decoded images."""
    folder = tmp_path / "data"
    folder.mkdir()
    _write_images(folder)
    path = folder / "d.jsonl"
    path.write_text(json.dumps(_chat(images=["a.png"])) + "\n")
    cfg = DataConfig()
    with caplog.at_level(logging.INFO, logger="lingshu_fast.data.index"):
        first = open_parts([path], template, cfg)[0]
        again = open_parts([path], template, cfg)[0]
        assert _count_builds(caplog) == 1 and first.index_path == again.index_path
        with open(path, "a") as f:
            f.write(json.dumps(_chat("text", "only")) + "\n")
        assert open_parts([path], template, cfg)[0].num_records == 2 and _count_builds(caplog) == 2
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
        open_parts([path], template, cfg)
        assert _count_builds(caplog) == 3
        other = open_parts([path], ChatTemplate(template.tokenizer, "Other system prompt."), cfg)[0]
        assert other.index_path != first.index_path and _count_builds(caplog) == 4
        strict = open_parts([path], template, DataConfig(strict=True))[0]
        assert strict.header["images_verified"] and _count_builds(caplog) == 5
        open_parts([path], template, cfg)  # a verified index serves a non-strict run
        assert _count_builds(caplog) == 5
    index_dir = tmp_path / "cache"
    assert str(index_dir) in open_parts([path], template, DataConfig(index_dir=str(index_dir)))[0].index_path


def _race(path, barrier, out):
    from lingshu_fast.data import scan
    from lingshu_fast.data.dataset import open_parts as open_

    real = scan.build_file

    def slow_build(*args):  # widen the window in which the others would also build
        with open(out, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        return real(*args)

    scan.build_file = slow_build
    import lingshu_fast.data.dataset as dataset

    dataset.build_file = slow_build
    template = ChatTemplate(load_tokenizer("tiny"))
    barrier.wait()
    part = open_([path], template, DataConfig())[0]
    assert part.num_records == 50


def test_racing_processes_build_the_index_once(tmp_path):
    """Ranks (on one node, or on nodes sharing the filesystem) that start together build the index
    once: the others wait on the file lock, then map the finished file."""
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(_chat("q", f"answer {k}")) for k in range(50)) + "\n")
    out = tmp_path / "builders.txt"
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=_race, args=(path, barrier, out)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    assert len(out.read_text().split()) == 1
