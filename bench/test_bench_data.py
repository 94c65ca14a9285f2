"""Data at scale (CPU): index build, rank start-up, and image throughput, with their peers side by side.

Data: a synthetic 1,000,000-record messages JSONL (`_write_records`: user question 8-40 words, answer
3-60 words from the tiny tokenizer's medical corpus, ~400 bytes a line), and the same with one image
per record, drawn from 300 real PNG/JPEG files (sides 200-1000 px) reused by path. Written once per
session under the pytest temp folder (~0.8 GB, ~2 minutes here).

Rows (records/s = records / wall time of the row):
- `index_scan[native|python]`, 1M text-only: parse + validate + render the chat template of every
  line, no tokens: `lingshu_fast._C.scan_jsonl` vs json + formats.parse_record + ChatTemplate.
- `index_build[native]`, 1M text-only: the whole index (scan, exact token counts, arrays) as
  `lingshu-fast index` builds it: the issue's target is >= 200k records/s. Counts come from the
  native BPE counter (csrc/bpe.cpp, exact for Qwen2-style tokenizers on ASCII text); the scanner
  runs on `scan_threads` threads (the usable cores, here 2), the rest of the build on one.
- `index_build[native_rust_tokens]` and `index_build[python]`: the same build with the counts
  from the Rust `tokenizers` batch encode (native scan), and all in Python + Rust tokenizer (what
  a pure-Python index costs), on the first 20,000 records (the rate is per record: 1M would take
  minutes here), marked `records=20000`.
- `index_build_images[native]`, 1M records with an image each: + path checks and header sizes.
- `rank_startup[index]`: a fresh process opens the built 1M index and plans epoch 0 (what each
  rank does at start-up): wall time and RSS growth (issue: < 5 s, < 500 MB).
  `rank_startup[today]`: the loader before the index (every rank parses and tokenises everything),
  from git history, on the first 20,000 records; `scaled_wall_s` / `scaled_rss_growth_mb` are its
  figures times 50 (it is linear in records), marked scaled.
- `images[...]`: decode + smart-resize of 32 real images (the 300's first) per core (torch and
  numpy on one thread): `lingshu_uint8` (the loader's CUDA path: bytes shipped), `lingshu_float32`
  (the host path, + normalise/patchify), `transformers` (Qwen2VLImageProcessorPil on the same
  files); all give the same pixels (checked).
Run: `pytest bench/test_bench_data.py --benchmark -q -s`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lingshu_fast.data.packing import load_native

ROOT = Path(__file__).resolve().parents[1]
N_RECORDS = 1_000_000
SUBSET = 20_000
N_IMAGE_FILES = 300
BASELINE_COMMIT = "fe198b1"  # the loader before the index
needs_native = pytest.mark.skipif(load_native("auto") is None or not hasattr(load_native("auto"), "scan_jsonl"),
                                  reason="lingshu_fast._C not built")


def _write_records(path: Path, n: int, images: list[str] | None = None, seed: int = 0) -> Path:
    words = np.array((ROOT / "lingshu_fast/assets/tiny_tokenizer/corpus.txt").read_text().split())
    rng = np.random.default_rng(seed)
    with open(path, "w") as out:
        for start in range(0, n, 10_000):
            m = min(10_000, n - start)
            q_len, a_len = rng.integers(8, 40, m), rng.integers(3, 60, m)
            picks = rng.integers(0, len(words), (m, 100))
            which = rng.integers(0, len(images), m) if images else None
            lines = []
            for j in range(m):
                record = {"messages": [
                    {"role": "user", "content": ("<image>" if images else "") + " ".join(words[picks[j, :q_len[j]]]) + "?"},
                    {"role": "assistant", "content": " ".join(words[picks[j, 40:40 + a_len[j]]]) + "."}]}
                if images:
                    record["images"] = [images[which[j]]]
                lines.append(json.dumps(record))
            out.write("\n".join(lines) + "\n")
    return path


def _write_images(folder: Path) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    names = []
    for k in range(N_IMAGE_FILES):
        h, w = (int(x) for x in rng.integers(200, 1000, 2))
        base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)  # blocky: compresses like scans
        pixels = np.kron(base, np.ones((8, 8, 1), np.uint8))[:h, :w]
        name = f"img{k:03d}.{'jpg' if k % 2 else 'png'}"
        Image.fromarray(pixels).save(folder / name, quality=90)
        names.append(name)
    return names


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data_bench")
    names = _write_images(folder / "images")
    text = _write_records(folder / "text.jsonl", N_RECORDS)
    subset = folder / "subset.jsonl"
    with open(text) as src, open(subset, "w") as dst:
        for _ in range(SUBSET):
            dst.write(src.readline())
    with_images = _write_records(folder / "images.jsonl", N_RECORDS, images=[f"images/{n}" for n in names], seed=2)
    return {"text": text, "subset": subset, "images": with_images, "image_files": [folder / "images" / n for n in names]}


@pytest.fixture(scope="module")
def template():
    from lingshu_fast.data.template import ChatTemplate
    from lingshu_fast.data.tokenizer import load_tokenizer

    return ChatTemplate(load_tokenizer("tiny"))


def _rate(info: dict, records: int, seconds: float, path: Path) -> None:
    info.update(records=records, wall_s=round(seconds, 2), records_per_s=round(records / seconds),
                mb_per_s=round(path.stat().st_size * records / max(1, _lines(path)) / seconds / 1e6, 1))


def _lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 24), b""))


@needs_native
@pytest.mark.parametrize("provider", ["native", "python"])
def test_bench_index_scan(benchmark, bench_info, data, template, provider):
    from lingshu_fast.data import scan

    spec = scan.ScanSpec(template)
    path = data["text"]

    def run():
        total, line = 0, 1
        for chunk, base in scan._chunks(path):
            if provider == "native":
                out = load_native("auto").scan_jsonl(np.frombuffer(chunk, np.uint8), line, template.system_prompt, False)
                total, line = total + len(out[0]), out[-1]
            else:
                rows, line = scan._rows_python(chunk, base, line, spec, str(path.parent), None, path)
                total += len(rows)
        return total

    start = time.perf_counter()
    total = benchmark.pedantic(run, rounds=1, iterations=1)
    _rate(bench_info, total, time.perf_counter() - start, path)
    bench_info.update(provider=provider, what="parse + validate + render, no tokens")
    bench_info["scan_threads"] = 1
    print(f"\nindex_scan[{provider}]: {bench_info['records_per_s']:,} records/s")


@needs_native
@pytest.mark.parametrize("provider", ["native", "native_rust_tokens", "python"])
def test_bench_index_build(benchmark, bench_info, data, template, provider):
    from lingshu_fast.data import scan

    path = data["text"] if provider == "native" else data["subset"]
    spec = scan.ScanSpec(template, backend="python" if provider == "python" else "native")
    if provider == "native_rust_tokens":
        spec.counter = lambda: None  # counts from the Rust library's batch encode
    start = time.perf_counter()
    header, _ = benchmark.pedantic(scan.build_file, args=(path, spec, False), rounds=1, iterations=1)
    _rate(bench_info, header["num_records"], time.perf_counter() - start, path)
    bench_info.update(provider=provider, counter=header["counter"], scanner=header["scanner"],
                      scan_threads=header.get("scan_threads", 0))
    print(f"\nindex_build[{provider}]: {header['num_records']:,} records, {bench_info['records_per_s']:,} records/s")
    if provider == "native":
        assert header["counter"] == "native" and header["num_records"] == N_RECORDS
        assert bench_info["records_per_s"] >= 200_000, "issue target: >= 200k records/s (text-only, native)"


@needs_native
def test_bench_index_build_images(benchmark, bench_info, data, template):
    from lingshu_fast.data import scan

    spec = scan.ScanSpec(template)
    start = time.perf_counter()
    header, arrays = benchmark.pedantic(scan.build_file, args=(data["images"], spec, False), rounds=1, iterations=1)
    _rate(bench_info, header["num_records"], time.perf_counter() - start, data["images"])
    bench_info.update(provider="native", images=int(len(arrays["image_hw"])), distinct_image_files=N_IMAGE_FILES)
    print(f"\nindex_build_images: {bench_info['records_per_s']:,} records/s")


_STARTUP = r"""
import json, sys, time
def rss_mb():
    fields = dict(l.split(":", 1) for l in open("/proc/self/status"))
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
import numpy, torch, transformers
from lingshu_fast.config import DataConfig
from lingshu_fast.data.tokenizer import load_tokenizer
tok = load_tokenizer("tiny")
sys.path.insert(0, sys.argv[3])
from {module} import PackedLoader
before, _ = rss_mb()
start = time.perf_counter()
cfg = DataConfig(train=[sys.argv[1]], max_length=512, max_tokens_per_microbatch=512, num_workers=0)
loader = PackedLoader(cfg.train, tok, cfg, seed=0)
wall = time.perf_counter() - start
after, peak = rss_mb()
print(json.dumps({{"wall_s": wall, "rss_growth_mb": peak - before, "samples": len(loader.lengths),
                  "microbatches": len(loader)}}))
"""


def _startup(module: str, data_path: Path, extra_path: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", _STARTUP.format(module=module), str(data_path), "", extra_path],
                          capture_output=True, text=True, env=env, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("provider", ["index", "today"])
def test_bench_rank_startup(benchmark, bench_info, data, template, provider, tmp_path):
    if provider == "index":
        from lingshu_fast.config import DataConfig
        from lingshu_fast.data.dataset import open_parts

        open_parts([data["text"]], template, DataConfig())  # built once, as by `lingshu-fast index`
        figures = benchmark.pedantic(_startup, args=("lingshu_fast.data.loader", data["text"], ""), rounds=1,
                                     iterations=1)
        bench_info.update(provider="index", records=N_RECORDS, wall_s=round(figures["wall_s"], 2),
                          rss_growth_mb=round(figures["rss_growth_mb"]), microbatches=figures["microbatches"])
        print(f"\nrank_startup[index] on {N_RECORDS:,} records: {figures['wall_s']:.2f} s, "
              f"+{figures['rss_growth_mb']:.0f} MB")
        assert figures["wall_s"] < 5.0 and figures["rss_growth_mb"] < 500, "issue target: < 5 s, < 500 MB"
        return
    source = subprocess.run(["git", "show", f"{BASELINE_COMMIT}:lingshu_fast/data/loader.py"], cwd=ROOT,
                            capture_output=True, text=True)
    if source.returncode != 0:
        pytest.skip(f"the baseline loader needs git history ({BASELINE_COMMIT})")
    (tmp_path / "baseline_loader.py").write_text(source.stdout)
    figures = benchmark.pedantic(_startup, args=("baseline_loader", data["subset"], str(tmp_path)), rounds=1,
                                 iterations=1)
    scale = N_RECORDS / SUBSET
    bench_info.update(provider="today", records=SUBSET, wall_s=round(figures["wall_s"], 2),
                      rss_growth_mb=round(figures["rss_growth_mb"]), scaled=f"x{scale:g} to {N_RECORDS:,} records",
                      scaled_wall_s=round(figures["wall_s"] * scale), scaled_rss_growth_mb=round(
                          figures["rss_growth_mb"] * scale))
    print(f"\nrank_startup[today] on {SUBSET:,} records: {figures['wall_s']:.1f} s, +{figures['rss_growth_mb']:.0f} MB "
          f"(x{scale:g}: {figures['wall_s'] * scale:.0f} s, {figures['rss_growth_mb'] * scale:.0f} MB)")


@pytest.mark.parametrize("provider", ["lingshu_uint8", "lingshu_float32", "transformers"])
def test_bench_images(benchmark, bench_info, data, provider):
    import PIL.Image
    import torch

    from lingshu_fast.data import images as img

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core: the loader's workers run single-threaded
    files = [str(p) for p in data["image_files"][:32]]
    min_pixels, max_pixels = 56 * 56, 28 * 28 * 1280
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    runs = {
        "lingshu_uint8": lambda: img.concat_uint8(img.resize_images(files, min_pixels=min_pixels, max_pixels=max_pixels)),
        "lingshu_float32": lambda: img.preprocess(files, min_pixels=min_pixels, max_pixels=max_pixels)[0],
        "transformers": lambda: processor([PIL.Image.open(f) for f in files], return_tensors="pt")["pixel_values"],
    }
    try:
        if provider != "lingshu_uint8":
            assert torch.equal(runs[provider](), runs["transformers"]())  # same pixels, or no figure
        benchmark.pedantic(runs[provider], rounds=5, iterations=1, warmup_rounds=1)
    finally:
        torch.set_num_threads(threads)
    best_s = benchmark.stats.stats.min
    bench_info.update(provider=provider, images=len(files), max_pixels=max_pixels,
                      images_per_s_per_core=round(len(files) / best_s, 1))
    print(f"\nimages[{provider}]: {len(files) / best_s:.1f} images/s per core")
