"""JSONL records -> validated `Sample`s, with every rejected record counted under a `SkipReason`.

Accepted record shapes (one JSON object per line):
- messages (ms-swift / LLaMA-Factory): `{"messages": [{"role", "content"}], "images": [paths]}`; each
  `<image>` marker in a content string places the next image. Content may also be a list of parts
  (`{"type": "text", "text"}` / `{"type": "image", "image": path}`), turned into markers; image paths
  in the parts are used when the record has no "images".
- ShareGPT: `{"conversations": [{"from": "human"|"gpt"|"system", "value"}], "images": [...]}`.
- also: a top-level "system" string (LLaMA-Factory), and `{"path": ...}` entries in "images" (ms-swift).
- caption pairs: `{"image": path, "caption": str}` -> user "<image>" + CAPTION_PROMPT, assistant caption.

Relative image paths resolve against `image_root` when given, else the JSONL file's folder.
Problems found here (bad_json, bad_schema, empty_assistant, image_count_mismatch, missing_image) are
reported as `SampleError(reason, message)`; the loader adds corrupt_image (while reading image headers
or decoding) and too_long (after tokenisation). Nothing is dropped without a reason and a count.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

from lingshu_fast.data.template import IMAGE_MARKER, ROLES, TemplateError, is_blank, parts_to_text

logger = logging.getLogger(__name__)

# The user turn of a caption pair: the image, then a fixed request (the LLaVA/Lingshu alignment style).
CAPTION_PROMPT = "Describe this image."
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}


class SkipReason(str, Enum):
    MISSING_IMAGE = "missing_image"
    CORRUPT_IMAGE = "corrupt_image"
    IMAGE_COUNT_MISMATCH = "image_count_mismatch"
    TOO_LONG = "too_long"
    EMPTY_ASSISTANT = "empty_assistant"
    BAD_JSON = "bad_json"
    BAD_SCHEMA = "bad_schema"


class DataError(ValueError):
    """Bad training data under data.strict=true (or unusable data at all); names file:line and why."""


class SampleError(ValueError):
    """One record is unusable; `reason` is the SkipReason it is counted under."""

    def __init__(self, reason: SkipReason, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Sample:
    """A validated record: normalised messages (string content with <image> markers) + image paths."""
    messages: list[dict]
    images: list[str] = field(default_factory=list)
    source: str = "<memory>"  # "file.jsonl:LINE" for messages, so a log can point at the record
    extra: dict = field(default_factory=dict)  # other top-level fields (answer, task, ...) for RL/eval


def _normalise_messages(raw, *, require_assistant: bool) -> tuple[list[dict], list]:
    if not isinstance(raw, list) or not raw:
        raise SampleError(SkipReason.BAD_SCHEMA, "'messages' must be a non-empty list")
    messages, part_images = [], []
    for k, m in enumerate(raw):
        if not isinstance(m, dict):
            raise SampleError(SkipReason.BAD_SCHEMA, f"message {k} is not an object")
        if "from" in m and "role" not in m:  # ShareGPT turn
            role, content = _SHAREGPT_ROLES.get(m["from"], m["from"]), m.get("value")
        else:
            role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise SampleError(SkipReason.BAD_SCHEMA, f"message {k}: role {role!r} is not one of {ROLES}")
        if isinstance(content, list):
            try:
                content, found = parts_to_text(content)
            except TemplateError as err:
                raise SampleError(SkipReason.BAD_SCHEMA, f"message {k}: {err}") from None
            part_images.extend(found)
        if not isinstance(content, str):
            raise SampleError(SkipReason.BAD_SCHEMA, f"message {k}: content must be a string or a part list")
        if role == "assistant" and is_blank(content):
            raise SampleError(SkipReason.EMPTY_ASSISTANT, f"message {k}: empty assistant turn")
        messages.append({"role": role, "content": content})
    if any(m["role"] == "system" for m in messages[1:]):
        raise SampleError(SkipReason.BAD_SCHEMA, "a system turn may only come first")
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise SampleError(SkipReason.BAD_SCHEMA, "no assistant turn: nothing to train on")
    return messages, part_images


def parse_record(obj, *, base_dir: Union[str, Path, None] = None, source: str = "<memory>",
                 require_assistant: bool = True, check_files: bool = True) -> Sample:
    """One decoded JSON object -> Sample, or SampleError. `require_assistant=False` for prompts
    (RL, eval), where the record carries the answer separately."""
    if not isinstance(obj, dict):
        raise SampleError(SkipReason.BAD_SCHEMA, f"a record must be a JSON object, got {type(obj).__name__}")
    if "messages" in obj or "conversations" in obj:
        messages, part_images = _normalise_messages(obj.get("messages", obj.get("conversations")),
                                                    require_assistant=require_assistant)
        system = obj.get("system")
        if isinstance(system, str) and messages[0]["role"] != "system":  # LLaMA-Factory's system column
            messages.insert(0, {"role": "system", "content": system})
        images = obj.get("images", None)
        if images is None:
            images = part_images
        elif isinstance(images, str):
            images = [images]
        elif isinstance(images, list):  # ms-swift also writes {"path": ...} entries
            images = [im["path"] if isinstance(im, dict) and isinstance(im.get("path"), str) else im
                      for im in images]
        known = {"messages", "conversations", "images", "system"}
    elif "caption" in obj or "image" in obj:
        caption, image = obj.get("caption"), obj.get("image")
        if not isinstance(caption, str) or not isinstance(image, str):
            raise SampleError(SkipReason.BAD_SCHEMA, "a caption pair needs string 'image' and 'caption'")
        if is_blank(caption):
            raise SampleError(SkipReason.EMPTY_ASSISTANT, "empty caption")
        prompt = obj.get("prompt", CAPTION_PROMPT)
        messages = [{"role": "user", "content": IMAGE_MARKER + prompt},
                    {"role": "assistant", "content": caption}]
        images, known = [image], {"image", "caption", "prompt"}
    else:
        raise SampleError(SkipReason.BAD_SCHEMA, "a record needs 'messages' (or 'conversations') or "
                                                 "'image'+'caption'")
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise SampleError(SkipReason.BAD_SCHEMA, "'images' must be a list of path strings")
    markers = sum(m["content"].count(IMAGE_MARKER) for m in messages)
    if markers != len(images):
        raise SampleError(SkipReason.IMAGE_COUNT_MISMATCH,
                          f"{markers} <image> markers but {len(images)} images")
    resolved = [resolve_image_path(p, base_dir) for p in images]
    if check_files:
        for p in resolved:
            if not os.path.isfile(p):
                raise SampleError(SkipReason.MISSING_IMAGE, f"image not found: {p}")
    extra = {k: v for k, v in obj.items() if k not in known}
    return Sample(messages=messages, images=resolved, source=source, extra=extra)


def resolve_image_path(path: str, base_dir: Union[str, Path, None]) -> str:
    path = os.path.expanduser(path)
    if os.path.isabs(path) or base_dir is None:
        return path
    return os.path.normpath(os.path.join(str(base_dir), path))


def iter_jsonl(handle) -> Iterator[tuple[int, object, Optional[str]]]:
    """(line number from 1, parsed object or None, "msg at column N" or None) per non-blank line of
    an open text file: the one JSONL reader of training data and benchmark files."""
    for line_no, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            yield line_no, json.loads(line), None
        except json.JSONDecodeError as err:
            yield line_no, None, f"{err.msg} at column {err.colno}"


def read_jsonl(path: Union[str, Path], *, image_root: Optional[str] = None, require_assistant: bool = True,
               check_files: bool = True) -> Iterator[tuple[str, Optional[Sample], Optional[SampleError]]]:
    """Yields (source "file:line", sample or None, error or None) for each non-blank line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    base_dir = image_root if image_root is not None else path.parent
    with path.open("r", encoding="utf-8") as handle:
        for line_no, obj, bad_json in iter_jsonl(handle):
            source = f"{path}:{line_no}"
            if bad_json is not None:
                yield source, None, SampleError(SkipReason.BAD_JSON, f"invalid JSON: {bad_json}")
                continue
            try:
                yield source, parse_record(obj, base_dir=base_dir, source=source,
                                           require_assistant=require_assistant, check_files=check_files), None
            except SampleError as err:
                yield source, None, err


class SkipLog:
    """Counts skipped records by reason and logs each one with its file:line; strict mode collects
    them so start-up can raise ONE error that lists every problem."""

    def __init__(self, strict: bool = False, max_listed: int = 20):
        self.strict = strict
        self.max_listed = max_listed
        self.counts: dict[str, int] = {r.value: 0 for r in SkipReason}
        self.problems: list[str] = []

    def add(self, source: str, err: SampleError) -> None:
        self.counts[err.reason.value] += 1
        line = f"{source}: {err.reason.value}: {err}"
        self.problems.append(line)
        if not self.strict:
            logger.warning("skipping sample %s", line)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def raise_if_strict(self) -> None:
        if self.strict and self.problems:
            listed = "\n  ".join(self.problems[: self.max_listed])
            more = len(self.problems) - self.max_listed
            tail = f"\n  ... and {more} more" if more > 0 else ""
            raise DataError(f"data.strict=true and {len(self.problems)} bad record(s) "
                            f"({ {k: v for k, v in self.counts.items() if v} }):\n  {listed}{tail}\n"
                            f"fix them, or set data.strict=false to skip them (counted in the metrics)")


def load_records(sources: Sequence, *, image_root: Optional[str] = None, skips: Optional[SkipLog] = None,
                 require_assistant: bool = True) -> list[Sample]:
    """JSONL paths and/or in-memory dicts/Samples -> valid Samples (bad ones go to `skips`)."""
    skips = skips if skips is not None else SkipLog()
    out: list[Sample] = []
    for index, src in enumerate(sources):
        if isinstance(src, Sample):
            out.append(src)
        elif isinstance(src, dict):
            source = f"<record {index}>"
            try:
                out.append(parse_record(src, base_dir=image_root, source=source,
                                        require_assistant=require_assistant))
            except SampleError as err:
                skips.add(source, err)
        else:
            for source, sample, err in read_jsonl(src, image_root=image_root, require_assistant=require_assistant):
                if err is not None:
                    skips.add(source, err)
                else:
                    out.append(sample)
    return out
