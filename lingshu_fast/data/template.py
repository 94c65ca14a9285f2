"""Qwen2.5-VL's ChatML chat template, rendered straight to token ids and loss labels.

Text layout (identical to Qwen2-VL's jinja template followed by the processor's expansion of each
`<|image_pad|>` into one token per merged 2x2 patch group):

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n      (when no system turn is given)
    <|im_start|>user\\n<|vision_start|><|image_pad|>*n<|vision_end|>question<|im_end|>\\n
    <|im_start|>assistant\\nanswer<|im_end|>\\n

Each `<image>` marker in a message's content (the ms-swift / LLaMA-Factory convention) becomes
`<|vision_start|>` + `<|image_pad|>` * n_i + `<|vision_end|>` with n_i = t*h*w / merge**2 taken from that
image's `image_grid_thw`, and nothing else (no newline), as LLaMA-Factory and ms-swift do.

Labels (`render`): -100 everywhere except each assistant turn's content tokens and its closing
`<|im_end|>` (the model must learn to stop). The "\\n" after `<|im_end|>` is NOT trained: it is a fixed
separator that generation never produces (decoding stops at `<|im_end|>`), the ms-swift choice.
Image tokens are never trained. Labels here are aligned with input_ids (label[i] is the token at i);
the shift for next-token prediction is done by the loader when it builds a MicroBatch.

The whole text is tokenised in one call, so token boundaries are exactly those a Hugging Face
processor gives; trained tokens are found from character offsets, which stays exact even when BPE
merges cross the role header / content boundary.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

import numpy as np

from lingshu_fast.data.tokenizer import special_token_ids

IMAGE_MARKER = "<image>"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
_VISION_TEXT = "<|vision_start|><|image_pad|><|vision_end|>"


class TemplateError(ValueError):
    """The messages cannot be rendered (unknown role, image count mismatch, ...)."""


class ChatTemplate:
    """Renders chat messages with one tokenizer; cheap to call per sample (one tokenizer call)."""

    def __init__(self, tokenizer, system_prompt: Optional[str] = None, ids: Optional[dict] = None):
        """`tokenizer`: a Hugging Face tokenizer, or a bare `tokenizers.Tokenizer` with `ids` given
        (the data workers' way: no transformers import)."""
        self.tokenizer = tokenizer
        self.ids = special_token_ids(tokenizer) if ids is None else dict(ids)
        self.system_prompt = DEFAULT_SYSTEM_PROMPT if system_prompt is None else system_prompt
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.backend = backend if backend is not None else (tokenizer if hasattr(tokenizer, "encode_batch") else None)

    # -- text ---------------------------------------------------------------------------------
    def _layout(self, messages: Sequence[dict], system_prompt: Optional[str], add_generation_prompt: bool):
        """(text with one <|image_pad|> per image, [(start, end) char spans that are trained])."""
        parts: list[str] = []
        trained_spans: list[tuple[int, int]] = []
        pos = 0

        def emit(piece: str, trained: bool = False):
            nonlocal pos
            if trained and piece:
                trained_spans.append((pos, pos + len(piece)))
            parts.append(piece)
            pos += len(piece)

        if not messages or messages[0].get("role") != "system":
            system = self.system_prompt if system_prompt is None else system_prompt
            emit(f"<|im_start|>system\n{system}<|im_end|>\n")
        for index, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            if role not in ROLES:
                raise TemplateError(f"message {index}: role {role!r} is not one of {ROLES}")
            if not isinstance(content, str):
                raise TemplateError(f"message {index}: content must be a string with <image> markers "
                                    f"(formats.py normalises part lists), got {type(content).__name__}")
            emit(f"<|im_start|>{role}\n")
            is_assistant = role == "assistant"
            chunks = content.split(IMAGE_MARKER)
            for k, chunk in enumerate(chunks):
                emit(chunk, trained=is_assistant)
                if k + 1 < len(chunks):
                    emit(_VISION_TEXT)  # never trained, even inside an assistant turn
            emit("<|im_end|>", trained=is_assistant)
            emit("\n")
        if add_generation_prompt:
            emit("<|im_start|>assistant\n")
        return "".join(parts), trained_spans

    def layout_text(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The text the tokenizer sees: one `<|image_pad|>` per image (what the index counts)."""
        return self._layout(messages, None, add_generation_prompt)[0]

    def render_text(self, messages: Sequence[dict], num_image_tokens: Sequence[int] = (),
                    system_prompt: Optional[str] = None, add_generation_prompt: bool = False) -> str:
        """The rendered string, image pads expanded (what a processor would tokenise)."""
        text, _ = self._layout(messages, system_prompt, add_generation_prompt)
        pieces = text.split("<|image_pad|>")
        if len(pieces) - 1 != len(num_image_tokens):
            raise TemplateError(f"{len(pieces) - 1} <image> markers but {len(num_image_tokens)} images")
        out = [pieces[0]]
        for n, piece in zip(num_image_tokens, pieces[1:]):
            out.append("<|image_pad|>" * int(n) + piece)
        return "".join(out)

    # -- ids ----------------------------------------------------------------------------------
    def _encode(self, messages, num_image_tokens, system_prompt, add_generation_prompt):
        text, spans = self._layout(messages, system_prompt, add_generation_prompt)
        if self.backend is not None:
            enc = self.backend.encode(text, add_special_tokens=False)
            return self._finish(enc.ids, enc.offsets, spans, num_image_tokens)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return self._finish(enc["input_ids"], enc["offset_mapping"], spans, num_image_tokens)

    def count_tokens(self, texts: Sequence[str]) -> np.ndarray:
        """Token counts (int64) of layout texts, one batched call without offsets: the index's counts.
        Equal to len(ids) of `render_many` on the same text before the image pads are expanded."""
        if not texts:
            return np.zeros(0, dtype=np.int64)
        if self.backend is not None:
            encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
            return np.fromiter((len(e.ids) for e in encode(list(texts), add_special_tokens=False)),
                               dtype=np.int64, count=len(texts))
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return np.asarray([len(x) for x in ids], dtype=np.int64)

    def _finish(self, token_ids, offsets, spans, num_image_tokens):
        """Token ids + char offsets of the layout text -> (expanded ids, trained mask)."""
        ids = np.asarray(token_ids, dtype=np.int64)
        starts = np.asarray([s for s, _ in offsets], dtype=np.int64)
        trained = np.zeros(len(ids), dtype=bool)
        for lo, hi in spans:
            trained |= (starts >= lo) & (starts < hi)
        image_id = self.ids["image_token_id"]
        pad_at = np.flatnonzero(ids == image_id)
        if len(pad_at) != len(num_image_tokens):
            raise TemplateError(f"{len(pad_at)} <image> markers in the messages but {len(num_image_tokens)} "
                                f"images were given")
        if len(pad_at):  # expand each single <|image_pad|> into n_i copies
            counts = np.ones(len(ids), dtype=np.int64)
            counts[pad_at] = np.asarray(num_image_tokens, dtype=np.int64)
            if (counts[pad_at] < 1).any():
                raise TemplateError(f"every image needs at least one token, got {list(num_image_tokens)}")
            ids, trained = np.repeat(ids, counts), np.repeat(trained, counts)
        vision = (ids == image_id) | (ids == self.ids["vision_start_token_id"]) | (ids == self.ids["vision_end_token_id"])
        trained &= ~vision
        return ids, trained

    def render_many(self, items: Sequence[tuple[Sequence[dict], Sequence[int]]],
                    system_prompt: Optional[str] = None) -> list:
        """`render` for many (messages, num_image_tokens) at once: one batched tokenizer call (the
        start-up scan's hot path). Each result is (input_ids, labels) or the TemplateError it raised."""
        layouts, results = [], [None] * len(items)
        for k, (messages, _) in enumerate(items):
            try:
                layouts.append((k, *self._layout(messages, system_prompt, False)))
            except TemplateError as err:
                results[k] = err
        if layouts:
            texts = [text for _, text, _ in layouts]
            if self.backend is not None:  # the Rust tokenizer directly: skips transformers' per-item conversion
                encodings = self.backend.encode_batch(texts, add_special_tokens=False)
                pairs = [(e.ids, e.offsets) for e in encodings]
            else:
                enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
                pairs = list(zip(enc["input_ids"], enc["offset_mapping"]))
            for j, (k, _, spans) in enumerate(layouts):
                try:
                    ids, trained = self._finish(*pairs[j], spans, items[k][1])
                    results[k] = (ids, np.where(trained, ids, IGNORE_INDEX).astype(np.int64))
                except TemplateError as err:
                    results[k] = err
        return results

    def render(self, messages: Sequence[dict], num_image_tokens: Sequence[int] = (),
               system_prompt: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids int64 [T], labels int64 [T]): labels = input_ids on assistant content and its
        <|im_end|>, -100 elsewhere; not shifted."""
        ids, trained = self._encode(messages, num_image_tokens, system_prompt, add_generation_prompt=False)
        labels = np.where(trained, ids, IGNORE_INDEX).astype(np.int64)
        return ids, labels

    def render_prompt(self, messages: Sequence[dict], num_image_tokens: Sequence[int] = (),
                      system_prompt: Optional[str] = None) -> np.ndarray:
        """input_ids int64 [T] of a generation prompt: the messages then `<|im_start|>assistant\\n`."""
        ids, _ = self._encode(messages, num_image_tokens, system_prompt, add_generation_prompt=True)
        return ids


def parts_to_text(parts: Sequence) -> tuple[str, list]:
    """OpenAI/HF content parts -> (text with <image> markers, image sources found in the parts)."""
    text, sources = [], []
    for part in parts:
        if isinstance(part, str):
            text.append(part)
            continue
        if not isinstance(part, dict):
            raise TemplateError(f"content part must be a dict or string, got {type(part).__name__}")
        kind = part.get("type")
        if kind == "image" or (kind is None and ("image" in part or "image_url" in part)):
            text.append(IMAGE_MARKER)
            src = part.get("image", part.get("path", part.get("url", part.get("image_url"))))
            if isinstance(src, dict):  # {"image_url": {"url": ...}}
                src = src.get("url")
            if src is not None:
                sources.append(src)
        elif kind == "text" or (kind is None and "text" in part):
            text.append(str(part.get("text", "")))
        else:
            raise TemplateError(f"unsupported content part type {kind!r} (text and image are)")
    return "".join(text), sources


_WS = re.compile(r"\s+")


def is_blank(text: str) -> bool:
    return not _WS.sub("", text)
