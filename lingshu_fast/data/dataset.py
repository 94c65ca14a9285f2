"""The samples of a run as index arrays: lengths for the packer, each record read only when needed.

`open_parts` gives one `Part` per JSONL file (its memory-mapped index, built once: index.py) and
one for any in-memory records (indexed in this process). `sample_lengths` turns a part's text
token counts and image sizes into exact sample lengths for this run's min/max pixels. A `Part`
pickles small (the file part as its paths; it maps its index again in a worker process), so data
workers read, render and tokenise records themselves: `read_sample(k)` seeks to the record's
line, parses it with formats.py and returns the Sample.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from lingshu_fast.data import images as img
from lingshu_fast.data.formats import (
    DataError,
    Sample,
    SampleError,
    SkipReason,
    confine_of,
    decode_line,
    parse_record,
    prompt_messages,
)
from lingshu_fast.data.index import REASONS, DataIndex, IndexSettings, open_index, read_header, tokenizer_digest
from lingshu_fast.data.scan import ScanSpec, build_file, build_records
from lingshu_fast.kernels.vision_geometry import PATCH_SIZE


class Part:
    """One data file (or the in-memory records) with its index arrays."""

    def __init__(self, name: str, *, index_path: Optional[str] = None, records: Optional[list] = None,
                 arrays: Optional[dict] = None, header: Optional[dict] = None, base_dir: Optional[str] = None,
                 confine_root: Optional[str] = None, mode: str = "train"):
        self.name, self.index_path, self.records = name, index_path, records
        self.base_dir, self.confine_root, self.mode = base_dir, confine_root, mode
        self._arrays, self._header = arrays, header
        self._fd: Optional[int] = None

    def _load(self) -> None:
        if self._arrays is None:
            found = read_header(Path(self.index_path))
            if found is None:
                raise DataError(f"the index {self.index_path} of {self.name} disappeared; run again to rebuild it")
            index = DataIndex(Path(self.index_path), *found)
            self._arrays, self._header = index.arrays, index.header

    def __getstate__(self):  # a file part travels as paths; the worker maps the index itself
        state = dict(self.__dict__, _fd=None)
        if self.index_path is not None:
            state.update(_arrays=None, _header=None)
        return state

    def __getattr__(self, name: str) -> np.ndarray:
        if name.startswith("_"):
            raise AttributeError(name)
        self._load()
        if name in self._arrays:
            return self._arrays[name]
        raise AttributeError(name)

    @property
    def header(self) -> dict:
        self._load()
        return self._header

    @property
    def num_records(self) -> int:
        return int(self.header["num_records"])

    def source(self, k: int) -> str:
        line = int(self.line[k])
        return f"{self.name}:{line}" if self.records is None else f"<record {line - 1}>"

    def bad_records(self) -> Iterator[tuple[str, str, str]]:
        """(source, reason, message) of the records the index left out."""
        blob = bytes(self.bad_message)
        bounds = self.bad_message_offset
        for k, (line, code) in enumerate(zip(self.bad_line.tolist(), self.bad_reason.tolist())):
            where = f"{self.name}:{line}" if self.records is None else f"<record {line - 1}>"
            yield where, REASONS[code], blob[int(bounds[k]):int(bounds[k + 1])].decode("utf-8", "replace")

    def bad_counts(self) -> dict[str, int]:
        return dict(self.header["bad_counts"])

    def read_sample(self, k: int) -> Sample:
        """Record k as a Sample (messages as the index rendered them: RL prompts without their
        reference answer), parsed again from its line; SampleError if it no longer parses."""
        source = self.source(k)
        if self.records is not None:
            obj = self.records[int(self.offset[k])]
        else:
            if self._fd is None:
                self._fd = os.open(self.name, os.O_RDONLY)
            raw = os.pread(self._fd, int(self.nbytes[k]), int(self.offset[k]))
            text, error = decode_line(raw, int(self.line[k]))
            if text is None:
                raise SampleError(SkipReason.BAD_JSON, error)
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                raise SampleError(SkipReason.BAD_JSON, f"invalid JSON: {err.msg}: the file changed after indexing?")
        sample = obj if isinstance(obj, Sample) else parse_record(
            obj, base_dir=self.base_dir, source=source, require_assistant=self.mode == "train", check_files=False,
            confine_root=self.confine_root)
        if self.mode == "prompt":
            sample.messages = prompt_messages(sample)
        return sample

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def sample_lengths(part: Part, *, min_pixels: int, max_pixels: int) -> np.ndarray:
    """Exact token count of every record of `part`: text tokens, each image's single pad replaced by
    its t*h*w/4 tokens after smart_resize (int64)."""
    text = np.asarray(part.text_tokens, dtype=np.int64)
    hw = np.asarray(part.image_hw, dtype=np.int64).reshape(-1, 2)
    starts = np.asarray(part.image_start, dtype=np.int64)
    if len(hw) == 0:
        return text
    tokens = img.image_token_counts(hw[:, 0], hw[:, 1], min_pixels=min_pixels, max_pixels=max_pixels)
    cumulative = np.concatenate([[0], np.cumsum(tokens - 1)])
    return text + cumulative[starts[1:]] - cumulative[starts[:-1]]


def record_length(part: Part, k: int, *, min_pixels: int, max_pixels: int) -> int:
    """`sample_lengths` of record k alone (what a worker checks its rendering against)."""
    lo, hi = int(part.image_start[k]), int(part.image_start[k + 1])
    text = int(part.text_tokens[k])
    if hi == lo:
        return text
    hw = np.asarray(part.image_hw[lo:hi], dtype=np.int64).reshape(-1, 2)
    return text + int((img.image_token_counts(hw[:, 0], hw[:, 1], min_pixels=min_pixels, max_pixels=max_pixels) - 1).sum())


def image_grids(part: Part, k: int, *, min_pixels: int, max_pixels: int) -> np.ndarray:
    """(t, h, w) patch grids int64 [n, 3] of record k's images, from the index's sizes."""
    lo, hi = int(part.image_start[k]), int(part.image_start[k + 1])
    hw = np.asarray(part.image_hw[lo:hi], dtype=np.int64).reshape(-1, 2)
    rh, rw = img.smart_resize_many(hw[:, 0], hw[:, 1], min_pixels=min_pixels, max_pixels=max_pixels)
    return np.stack([np.ones_like(rh), rh // PATCH_SIZE, rw // PATCH_SIZE], axis=1)


def open_parts(sources: Sequence, template, cfg, *, mode: str = "train", index_dir: Optional[str] = None,
               backend: str = "auto") -> list[Part]:
    """One Part per JSONL path of `sources` (indexed once, see index.py), plus one for the dicts and
    Samples among them. `cfg`: the DataConfig (image_root, confine_images, strict, index_dir)."""
    image_root = str(Path(cfg.image_root).expanduser().resolve()) if cfg.image_root else None
    confine = confine_of(getattr(cfg, "confine_images", None), cfg.image_root)
    spec = ScanSpec(template, mode=mode, image_root=image_root, confine=confine, backend=backend)
    settings = IndexSettings(tokenizer=tokenizer_digest(template.tokenizer), system_prompt=template.system_prompt,
                             image_root=image_root, confine=confine, mode=mode)
    index_dir = index_dir if index_dir is not None else getattr(cfg, "index_dir", None)
    parts, memory = [], []
    for position, src in enumerate(sources):
        if isinstance(src, (dict, Sample)):
            memory.append((position, src))
            continue
        path = Path(src)
        index = open_index(path, settings, lambda p, verify: build_file(p, spec, verify), index_dir=index_dir,
                           need_verified=cfg.strict)
        base_dir = image_root if image_root is not None else str(path.resolve().parent)
        parts.append(Part(str(path), index_path=str(index.path), base_dir=base_dir,
                          confine_root=base_dir if confine else None, mode=mode))
    if memory:
        records = [None] * (memory[-1][0] + 1)
        for position, src in memory:
            records[position] = src
        header, arrays = build_records([src for _, src in memory], spec, cfg.strict)
        # line k+1 <-> sources[k]; offset: the position in `records`
        arrays["line"] = np.asarray([memory[int(o)][0] + 1 for o in arrays["offset"]], dtype=np.int64)
        arrays["offset"] = arrays["line"] - 1
        arrays["bad_line"] = np.asarray([memory[int(b) - 1][0] + 1 for b in arrays["bad_line"]], dtype=np.int64)
        parts.append(Part("<memory>", records=records, arrays=arrays, header=header, base_dir=image_root,
                          confine_root=image_root if confine and image_root else None, mode=mode))
    return parts


def select_usable(parts: Sequence[Part], *, min_pixels: int, max_pixels: int, limit: int, why: str,
                  skips) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(lengths, record ids, first record id of each part, problems) of the samples that fit
    `limit` tokens. Every bad record of the indexes and every too_long one goes to `skips` (a
    formats.SkipLog); `problems` names each source left with no usable sample."""
    lengths, records, empty = [], [], []
    part_starts = np.zeros(len(parts) + 1, dtype=np.int64)
    for p, part in enumerate(parts):
        for source, reason, message in part.bad_records():
            skips.add(source, SampleError(SkipReason(reason), message))
        n = part.num_records
        part_starts[p + 1] = part_starts[p] + n
        part_lengths = sample_lengths(part, min_pixels=min_pixels, max_pixels=max_pixels)
        too_long = np.flatnonzero(part_lengths > limit)
        for k in too_long.tolist():
            skips.add(part.source(k), SampleError(SkipReason.TOO_LONG, f"{int(part_lengths[k])} tokens > {limit} ({why})"))
        keep = np.ones(n, dtype=bool)
        keep[too_long] = False
        if not keep.any():
            counts = {k: v for k, v in part.bad_counts().items() if v}
            if len(too_long):
                counts["too_long"] = len(too_long)
            empty.append(f"{part.name}: no usable sample among its {n + sum(counts.values()) - len(too_long)} "
                         f"records (skipped: {counts})")
        lengths.append(part_lengths[keep])
        records.append(np.flatnonzero(keep) + part_starts[p])
    if not parts:
        empty.append("no data: data.train is empty")
    concat = (lambda xs: np.concatenate(xs)) if parts else (lambda xs: np.zeros(0, np.int64))
    return concat(lengths), concat(records), part_starts, empty
