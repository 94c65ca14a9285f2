"""JSONL records -> validated `Sample`s, with every rejected record counted under a `SkipReason`.

Accepted record shapes (one JSON object per line):
- messages (ms-swift / LLaMA-Factory): `{"messages": [{"role", "content"}], "images": [paths]}`; each
  `<image>` marker in a content string places the next image. Content may also be a list of parts
  (`{"type": "text", "text"}` / `{"type": "image", "image": path}`), turned into markers; image paths
  in the parts are used when the record has no "images".
- ShareGPT: `{"conversations": [{"from": "human"|"gpt"|"system", "value"}], "images": [...]}`.
- also: a top-level "system" string (LLaMA-Factory), and `{"path": ...}` entries in "images" (ms-swift).
- caption pairs: `{"image": path, "caption": str}` -> user "<image>" + CAPTION_PROMPT, assistant caption.

Relative image paths resolve against `image_root` when given, else the JSONL file's folder. With
`confine_root` (data.confine_images, on by default when data.image_root is set) a path that resolves
outside that folder (`../`, an absolute path, `~`) is a bad record (image_outside_root): a data file
cannot make the trainer read arbitrary files. The check is lexical (after normpath), so symlinks
inside the root are followed.

Lines are read as bytes and decoded one by one: a line that is not UTF-8 is a bad record
(`file:line: bad_json: not UTF-8 ...`: JSON text must be UTF-8), never a crash, and a UTF-8 byte-order
mark before the first line is accepted. Problems found here (bad_json, bad_schema, empty_assistant,
image_count_mismatch, missing_image, image_outside_root) are reported as `SampleError(reason,
message)`; the loader adds corrupt_image (while reading image headers or decoding) and too_long
(after tokenisation). Nothing is dropped without a reason and a count.
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
    IMAGE_OUTSIDE_ROOT = "image_outside_root"


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
                 require_assistant: bool = True, check_files: bool = True,
                 confine_root: Union[str, Path, None] = None) -> Sample:
    """One decoded JSON object -> Sample, or SampleError. `require_assistant=False` for prompts
    (RL, eval), where the record carries the answer separately. `confine_root`: image paths must
    resolve inside this folder (see the module docstring)."""
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
        if not isinstance(prompt, str):
            raise SampleError(SkipReason.BAD_SCHEMA, "a caption pair's 'prompt' must be a string")
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
    resolved = [check_image_path(p, base_dir, confine_root) for p in images]
    if check_files:
        for p in resolved:
            if not os.path.isfile(p):
                raise missing_image(p)
    extra = {k: v for k, v in obj.items() if k not in known}
    return Sample(messages=messages, images=resolved, source=source, extra=extra)


def resolve_image_path(path: str, base_dir: Union[str, Path, None]) -> str:
    path = os.path.expanduser(path)
    if os.path.isabs(path) or base_dir is None:
        return os.path.normpath(path)
    return os.path.normpath(os.path.join(str(base_dir), path))


def check_image_path(raw: str, base_dir: Union[str, Path, None], confine_root: Union[str, Path, None]) -> str:
    """The resolved path of one image entry; SampleError(image_outside_root) when `confine_root` is
    given and the path leaves it."""
    path = resolve_image_path(raw, base_dir)
    if confine_root is not None and not is_inside(path, confine_root):
        raise SampleError(SkipReason.IMAGE_OUTSIDE_ROOT,
                          f"image path {raw!r} resolves to {path}, outside {confine_root} (data.confine_images"
                          f"=true: images must lie under data.image_root, or the JSONL's folder without it)")
    return path


def missing_image(path: str) -> SampleError:
    return SampleError(SkipReason.MISSING_IMAGE, f"image not found: {path}")


def prompt_messages(sample: Sample) -> list[dict]:
    """An RL prompt's messages: the record needs an 'answer' for the verifiers; trailing assistant
    turns (a reference answer) are dropped, and what is left must end with a user turn."""
    if "answer" not in sample.extra:
        raise SampleError(SkipReason.BAD_SCHEMA, "an RL record needs an 'answer' for the verifiers")
    messages = list(sample.messages)
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    if not messages or messages[-1]["role"] != "user":
        raise SampleError(SkipReason.BAD_SCHEMA, "an RL prompt must end with a user turn")
    return messages


def is_inside(path: str, root: Union[str, Path]) -> bool:
    """Whether the (normalised) `path` lies in the folder `root`, compared lexically."""
    root = os.path.normpath(os.path.abspath(str(root)))
    path = os.path.normpath(os.path.abspath(path))
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


UTF8_BOM = b"\xef\xbb\xbf"


def decode_line(raw: Union[bytes, str], line_no: int) -> tuple[Optional[str], Optional[str]]:
    """(text, None), or (None, "not UTF-8: ...") for a line that does not decode; the BOM of the
    first line is dropped."""
    if isinstance(raw, str):
        return (raw[1:] if line_no == 1 and raw.startswith("\ufeff") else raw), None
    if line_no == 1 and raw.startswith(UTF8_BOM):
        raw = raw[len(UTF8_BOM):]
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as err:
        return None, (f"not UTF-8: byte 0x{raw[err.start]:02x} at column {err.start + 1} ({err.reason}); "
                      f"re-encode the file as UTF-8")


def iter_lines(handle) -> Iterator[tuple[int, int, object, Optional[str]]]:
    """(line number from 1, offset of the line, parsed object or None, error or None) per non-blank
    line of an open file: the error is "not UTF-8: ..." or "invalid JSON: <msg> at column N". Open
    the file in binary mode: then offsets are in bytes and undecodable lines are reported, not raised."""
    offset = 0
    for line_no, raw in enumerate(handle, start=1):
        start, offset = offset, offset + len(raw)
        text, error = decode_line(raw, line_no)
        if text is None:
            yield line_no, start, None, error
            continue
        if not text.strip():
            continue
        try:
            yield line_no, start, json.loads(text), None
        except json.JSONDecodeError as err:
            yield line_no, start, None, f"invalid JSON: {err.msg} at column {err.colno}"


def iter_jsonl(handle) -> Iterator[tuple[int, object, Optional[str]]]:
    """(line number from 1, parsed object or None, "msg at column N" or None) per non-blank line of
    an open file (text or binary): the one JSONL reader of training data and benchmark files."""
    for line_no, _, obj, error in iter_lines(handle):
        yield line_no, obj, None if error is None else error.removeprefix("invalid JSON: ")


def read_jsonl(path: Union[str, Path], *, image_root: Optional[str] = None, require_assistant: bool = True,
               check_files: bool = True, confine_images: Optional[bool] = None
               ) -> Iterator[tuple[str, Optional[Sample], Optional[SampleError]]]:
    """Yields (source "file:line", sample or None, error or None) for each non-blank line.
    `confine_images`: None means on when `image_root` is given (data.confine_images)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    base_dir = image_root if image_root is not None else path.parent
    confine_root = base_dir if confine_of(confine_images, image_root) else None
    with path.open("rb") as handle:
        for line_no, _, obj, error in iter_lines(handle):
            source = f"{path}:{line_no}"
            if error is not None:
                yield source, None, SampleError(SkipReason.BAD_JSON, error)
                continue
            try:
                yield source, parse_record(obj, base_dir=base_dir, source=source, require_assistant=require_assistant,
                                           check_files=check_files, confine_root=confine_root), None
            except SampleError as err:
                yield source, None, err


def confine_of(confine_images: Optional[bool], image_root: Optional[str]) -> bool:
    """data.confine_images: null means on exactly when data.image_root is set."""
    return bool(image_root) if confine_images is None else bool(confine_images)


class SkipLog:
    """Counts skipped records by reason and logs each one with its file:line (the first
    `max_logged`, when given; `log_summary` then says how many there were); strict mode collects
    them instead so start-up can raise ONE error that lists every problem."""

    def __init__(self, strict: bool = False, max_listed: int = 20, max_logged: Optional[int] = None):
        self.strict = strict
        self.max_listed = max_listed
        self.max_logged = max_logged
        self.counts: dict[str, int] = {r.value: 0 for r in SkipReason}
        self.problems: list[str] = []

    def add(self, source: str, err: SampleError) -> None:
        self.counts[err.reason.value] += 1
        line = f"{source}: {err.reason.value}: {err}"
        if self.strict:
            self.problems.append(line)
        elif self.max_logged is None or self.total <= self.max_logged:
            logger.warning("skipping sample %s", line)

    def log_summary(self, context: str = "") -> None:
        if not self.strict and self.total:
            logger.warning("skipped %d record(s) at start-up (%s)%s", self.total,
                           ", ".join(f"{k}: {v}" for k, v in self.counts.items() if v), f"; {context}" if context else "")

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
                 require_assistant: bool = True, confine_images: Optional[bool] = None) -> list[Sample]:
    """JSONL paths and/or in-memory dicts/Samples -> valid Samples (bad ones go to `skips`)."""
    skips = skips if skips is not None else SkipLog()
    out: list[Sample] = []
    confine_root = image_root if image_root is not None and confine_of(confine_images, image_root) else None
    for index, src in enumerate(sources):
        if isinstance(src, Sample):
            out.append(src)
        elif isinstance(src, dict):
            source = f"<record {index}>"
            try:
                out.append(parse_record(src, base_dir=image_root, source=source,
                                        require_assistant=require_assistant, confine_root=confine_root))
            except SampleError as err:
                skips.add(source, err)
        else:
            for source, sample, err in read_jsonl(src, image_root=image_root, require_assistant=require_assistant,
                                                  confine_images=confine_images):
                if err is not None:
                    skips.add(source, err)
                else:
                    out.append(sample)
    return out
