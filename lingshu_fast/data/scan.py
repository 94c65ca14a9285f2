"""Building an index: JSONL bytes -> per-record arrays + bad records (the format is index.py's).

Per 16 MiB chunk of whole lines:
1. Records. The native scanner (`lingshu_fast._C.scan_jsonl`, csrc/jsonl.cpp) renders the plain
   records itself: JSON parse, the checks of formats.parse_record, the chat template's text. Every
   other line (content part lists, odd JSON, anything wrong) it hands back, and formats.py parses
   it as without the scanner: one home for each rule and each error message. With data.strict or
   without the native module, Python does all lines (`backend="python"` forces it).
2. Images: each entry is resolved (image root, confinement), checked to exist, and its header read
   once per distinct path (threads: header reads wait on storage); under verify (data.strict) every
   image is decoded instead, catching truncated files a header read cannot see. The aspect-ratio
   rule of smart_resize is applied here, so that sizes in the index always resize.
3. Tokens: the scanner counts them itself with the native BPE counter (bpe_count.py: exact for
   Qwen2-style tokenizers on ASCII text); every other text is counted by one batched call of the
   Rust tokenizer. Image pads are not expanded yet: a sample's length is text_tokens - images +
   its images' tokens (dataset.sample_lengths).
The native scanner runs on one thread per usable core (at most 8) over parts of each chunk.

The order of checks per record is the loader's of old: schema and paths, missing files, headers,
template; the first failure names the record's reason.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from lingshu_fast.data import images as img
from lingshu_fast.data.formats import (
    Sample,
    SampleError,
    SkipReason,
    check_image_path,
    decode_line,
    missing_image,
    parse_record,
    prompt_messages,
)
from lingshu_fast.data.index import pack_bad
from lingshu_fast.data.template import ChatTemplate, TemplateError

CHUNK_BYTES = 16 << 20
SCAN_THREADS = 8  # native scanner threads per build, at most the usable cores
HEADER_THREADS = 8
IMAGE_PAD = "<|image_pad|>"


@dataclass
class ScanSpec:
    """What a build needs besides the file: the template (tokenizer + system prompt), record kind,
    where images live and whether paths are confined, and which scanner to use."""
    template: ChatTemplate
    mode: str = "train"  # or "prompt" (RL)
    image_root: Optional[str] = None
    confine: bool = False
    backend: str = "auto"  # "auto" | "native" | "python"

    def native(self):
        if self.backend == "python":
            return None
        from lingshu_fast.data.packing import load_native

        module = load_native("native" if self.backend == "native" else "auto")
        return module if module is not None and hasattr(module, "scan_jsonl") else None

    def counter(self):
        """The native token counter for this tokenizer (bpe_count.py), or None."""
        if self.backend == "python":
            return None
        from lingshu_fast.data.bpe_count import native_counter

        return native_counter(self.template.tokenizer)


class ImageChecks:
    """Existence, header size (or full decode) and the aspect-ratio rule, once per distinct path."""

    def __init__(self, verify: bool):
        self.verify = verify
        self.sizes: dict[str, object] = {}  # path -> (h, w) or SampleError

    def _probe(self, path: str):
        try:
            if self.verify:
                height, width = img.load_image(path).shape[:2]
            else:
                height, width = img.read_image_size(path)
            img.smart_resize(height, width)  # aspect ratio / empty image: the rules every resize applies
            return int(height), int(width)
        except img.ImageError as err:
            return SampleError(SkipReason.CORRUPT_IMAGE, str(err) if str(path) in str(err) else f"{path}: {err}")

    def prefetch(self, paths: Sequence[str]) -> None:
        todo = sorted({p for p in paths if p not in self.sizes})
        if not todo:
            return
        exists = {p: Path(p).is_file() for p in todo}
        for p in todo:
            if not exists[p]:
                self.sizes[p] = missing_image(p)
        readable = [p for p in todo if exists[p]]
        if len(readable) > 1:
            with ThreadPoolExecutor(min(HEADER_THREADS, len(readable))) as pool:
                self.sizes.update(zip(readable, pool.map(self._probe, readable)))
        elif readable:
            self.sizes[readable[0]] = self._probe(readable[0])

    def sizes_of(self, paths: Sequence[str]) -> list[tuple[int, int]]:
        """(h, w) of each path, or the record's SampleError: missing files first, then headers."""
        self.prefetch(paths)
        found = [self.sizes[p] for p in paths]
        for kind in (SkipReason.MISSING_IMAGE, SkipReason.CORRUPT_IMAGE):
            for value in found:
                if isinstance(value, SampleError) and value.reason is kind:
                    raise value
        return found


class IndexBuilder:
    """Accumulates records chunk by chunk in file order; `finish()` gives (header extras, arrays)."""

    def __init__(self, spec: ScanSpec, checks: ImageChecks):
        self.spec, self.checks = spec, checks
        self.chunks: list[dict[str, np.ndarray]] = []
        self.image_hw: list[tuple[int, int]] = []
        self.bad: list[tuple[int, str, str]] = []

    def add_chunk(self, rows: list[tuple[int, int, int, object]], counted: Optional[dict] = None) -> None:
        """rows: (line, offset, nbytes, (text, resolved image paths[, token count]) | SampleError) in
        file order (a text is None when its tokens are counted). `counted`: arrays line, offset,
        nbytes, tokens of text-only records the native scanner finished (no per-record Python)."""
        texts, kept = [], []
        self.checks.prefetch([p for *_, item in rows if not isinstance(item, SampleError) for p in item[1]])
        for line, offset, nbytes, item in rows:
            if isinstance(item, SampleError):
                self.bad.append((line, item.reason.value, str(item)))
                continue
            text, paths = item[0], item[1]
            tokens = item[2] if len(item) > 2 else -1
            try:
                sizes = self.checks.sizes_of(paths) if paths else []
                if text is not None and text.count(IMAGE_PAD) != len(paths):  # a literal <|image_pad|>
                    raise SampleError(SkipReason.BAD_SCHEMA, f"{text.count(IMAGE_PAD)} <image> markers in the "
                                                             f"messages but {len(paths)} images were given")
            except SampleError as err:
                self.bad.append((line, err.reason.value, str(err)))
                continue
            if tokens < 0:
                texts.append(text)
            kept.append((line, offset, nbytes, tokens, len(sizes)))
            self.image_hw.extend(sizes)
        tokenized = self.spec.template.count_tokens(texts)
        table = np.asarray(kept, dtype=np.int64).reshape(-1, 5)
        if len(texts):
            table[table[:, 3] < 0, 3] = tokenized
        chunk = {"line": table[:, 0], "offset": table[:, 1], "nbytes": table[:, 2], "tokens": table[:, 3],
                 "images": table[:, 4]}
        if counted is not None and len(counted["line"]):
            chunk = {k: np.concatenate([chunk[k], counted[k] if k in counted else np.zeros(len(counted["line"]),
                                                                                         np.int64)])
                     for k in chunk}
            order = np.argsort(chunk["line"], kind="stable")  # images only in `rows`: hw order is kept
            chunk = {k: v[order] for k, v in chunk.items()}
        self.chunks.append(chunk)

    def finish(self, **extras) -> tuple[dict, dict[str, np.ndarray]]:
        joined = {k: np.concatenate([c[k] for c in self.chunks]) if self.chunks else np.zeros(0, np.int64)
                  for k in ("line", "offset", "nbytes", "tokens", "images")}
        starts = np.zeros(len(joined["line"]) + 1, dtype=np.int64)
        np.cumsum(joined["images"], out=starts[1:])
        self.bad.sort()
        arrays = {"offset": joined["offset"], "nbytes": joined["nbytes"], "line": joined["line"],
                  "text_tokens": joined["tokens"].astype(np.int32), "image_start": starts,
                  "image_hw": np.asarray(self.image_hw, dtype=np.int32).reshape(-1, 2), **pack_bad(self.bad)}
        counts = {r.value: 0 for r in SkipReason}
        for _, reason, _ in self.bad:
            counts[reason] += 1
        return {"num_records": len(joined["line"]), "bad_counts": counts, **extras}, arrays


def python_record(obj, spec: ScanSpec, *, base_dir, confine_root, source: str):
    """One decoded JSON value -> (rendered text, resolved image paths) or SampleError (formats.py)."""
    try:
        sample = obj if isinstance(obj, Sample) else parse_record(
            obj, base_dir=base_dir, source=source, require_assistant=spec.mode == "train", check_files=False,
            confine_root=confine_root)
        messages = prompt_messages(sample) if spec.mode == "prompt" else sample.messages
        try:
            text = spec.template.layout_text(messages, add_generation_prompt=spec.mode == "prompt")
        except TemplateError as err:
            raise SampleError(SkipReason.BAD_SCHEMA, str(err)) from None
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:  # JSON's "\ud800" escapes decode to text no tokenizer takes
            raise SampleError(SkipReason.BAD_SCHEMA, f"unpaired surrogate {text[err.start]!r} in the text "
                                                     f"(an invalid \\u escape)") from None
        return text, sample.images
    except SampleError as err:
        return err


def _python_line(raw: bytes, line: int, spec: ScanSpec, base_dir, confine_root, source: str):
    """A raw line -> None (blank) or what python_record gives."""
    import json

    text, error = decode_line(raw, line)
    if text is None:
        return SampleError(SkipReason.BAD_JSON, error)
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        return SampleError(SkipReason.BAD_JSON, f"invalid JSON: {err.msg} at column {err.colno}")
    return python_record(obj, spec, base_dir=base_dir, confine_root=confine_root, source=source)


def _chunks(path: Path):
    """(bytes of whole lines, offset of its first byte) of the file, CHUNK_BYTES at a time."""
    with open(path, "rb") as handle:
        base, rest = 0, b""
        while True:
            block = handle.read(CHUNK_BYTES)
            if not block:
                if rest:
                    yield rest, base
                return
            data = rest + block
            cut = data.rfind(b"\n") + 1
            if cut == 0:
                rest = data
                continue
            yield data[:cut], base
            base, rest = base + cut, data[cut:]


def _scan_parallel(native, counters, pool, data: bytes, line: int, spec: ScanSpec):
    """scan_jsonl over `data` split at line ends into one part per counter, run in threads (the
    scanner releases the GIL); the parts' results joined as one call's would be."""
    view = np.frombuffer(data, dtype=np.uint8)
    cuts = [0]
    for k in range(1, len(counters)):
        at = data.find(b"\n", max(cuts[-1], len(data) * k // len(counters)))
        cuts.append(len(data) if at < 0 else at + 1)
    cuts.append(len(data))
    firsts = [line]
    for lo, hi in zip(cuts[:-2], cuts[1:-1]):
        firsts.append(firsts[-1] + data.count(b"\n", lo, hi))

    def scan(k):
        return native.scan_jsonl(view[cuts[k]:cuts[k + 1]], firsts[k], spec.template.system_prompt,
                                 spec.mode == "prompt", counters[k])

    parts = list(pool.map(scan, range(len(counters)))) if len(counters) > 1 else [scan(0)]
    joined = []
    for field in range(10):
        values = [part[field] for part in parts]
        if field in (1, 8):  # offsets: relative to each part
            values = [v + cuts[k] for k, v in enumerate(values)]
        joined.append(np.concatenate(values) if isinstance(values[0], np.ndarray) else [x for v in values for x in v])
    return (*joined, parts[-1][10])


def _rows_native(native, counters, pool, data: bytes, base: int, line: int, spec: ScanSpec, base_dir, confine_root,
                 path):
    (lines, offsets, nbytes, image_counts, tokens, texts, raw_paths, fb_line, fb_offset, fb_nbytes,
     next_line) = _scan_parallel(native, counters, pool, data, line, spec)
    done = (image_counts == 0) & (tokens >= 0)  # text-only and counted: finished, as arrays
    counted = {"line": lines[done], "offset": offsets[done] + base, "nbytes": nbytes[done], "tokens": tokens[done]}
    rows, resolved = [], {}
    starts = np.concatenate([[0], np.cumsum(image_counts)]).tolist()
    for k in np.flatnonzero(~done).tolist():
        raws = raw_paths[starts[k]:starts[k + 1]]
        try:
            paths = []
            for raw in raws:
                if raw not in resolved:
                    try:
                        resolved[raw] = check_image_path(raw, base_dir, confine_root)
                    except SampleError as err:
                        resolved[raw] = err
                if isinstance(resolved[raw], SampleError):
                    raise resolved[raw]
                paths.append(resolved[raw])
            item = (texts[k], paths, int(tokens[k]))
        except SampleError as err:
            item = err
        rows.append((int(lines[k]), base + int(offsets[k]), int(nbytes[k]), item))
    for fl, fo, fn in zip(fb_line.tolist(), fb_offset.tolist(), fb_nbytes.tolist()):
        item = _python_line(data[fo:fo + fn], fl, spec, base_dir, confine_root, f"{path}:{fl}")
        if item is not None:
            rows.append((fl, base + fo, fn, item))
    rows.sort(key=lambda row: row[0])
    return rows, counted, int(next_line)


def _rows_python(data: bytes, base: int, line: int, spec: ScanSpec, base_dir, confine_root, path):
    rows, offset = [], 0
    for raw in data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n"):
        item = _python_line(raw, line, spec, base_dir, confine_root, f"{path}:{line}")
        if item is not None:
            rows.append((line, base + offset, len(raw), item))
        offset += len(raw) + 1
        line += 1
    return rows, line


def build_file(path: Path, spec: ScanSpec, verify: bool) -> tuple[dict, dict[str, np.ndarray]]:
    """The index arrays of one JSONL file (index.open_index calls this under its lock)."""
    start = time.perf_counter()
    base_dir = spec.image_root if spec.image_root is not None else str(path.parent)
    confine_root = base_dir if spec.confine else None
    native = spec.native()
    counter = spec.counter() if native is not None else None
    threads = max(1, min(SCAN_THREADS, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1))
    threads = threads if native is not None else 1
    counters = [counter] + [counter.clone() if counter is not None else None for _ in range(threads - 1)]
    builder = IndexBuilder(spec, ImageChecks(verify))
    line = 1
    with ThreadPoolExecutor(threads) as pool:
        for data, base in _chunks(path):
            if native is not None:
                rows, counted, line = _rows_native(native, counters, pool, data, base, line, spec, base_dir,
                                                   confine_root, path)
            else:
                (rows, line), counted = _rows_python(data, base, line, spec, base_dir, confine_root, path), None
            builder.add_chunk(rows, counted)
    return builder.finish(build_s=round(time.perf_counter() - start, 3), scanner="native" if native else "python",
                          counter="native" if counter is not None else "rust", scan_threads=threads)


def build_records(records: Sequence, spec: ScanSpec, verify: bool) -> tuple[dict, dict[str, np.ndarray]]:
    """The same arrays for in-memory records (dicts or Samples); `offset` is the record's position."""
    confine_root = spec.image_root if spec.confine and spec.image_root is not None else None
    builder = IndexBuilder(spec, ImageChecks(verify))
    rows = [(k + 1, k, 0, python_record(obj, spec, base_dir=spec.image_root, confine_root=confine_root,
                                         source=f"<record {k}>")) for k, obj in enumerate(records)]
    builder.add_chunk(rows)
    return builder.finish()
