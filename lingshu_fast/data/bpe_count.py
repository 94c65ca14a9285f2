"""The native token counter of the index (csrc/bpe.cpp), for tokenizers whose counts it gets exactly.

Qwen2 / Qwen2.5-VL's tokenizer (and the embedded tiny one) is byte-level BPE behind Qwen2's split
regex; for ASCII text, which most English records are, counting its tokens needs only the merge
ranks, a hand-written pre-tokeniser and a per-word cache. `native_counter(tokenizer)` returns the
counter only when the tokenizer is exactly of that shape, read from its own serialisation:
- added tokens all matched on the raw text (normalized, lstrip, rstrip, single_word all false);
- no normaliser, or only Unicode NF(K)C/D ones (ASCII is invariant under them);
- pre-tokeniser: Split(Qwen2's regex, isolated) then ByteLevel without prefix space or its own regex;
- model: BPE without dropout, subword prefix/suffix or byte fallback, every single byte in the vocab;
- no truncation or padding.
Otherwise it returns None and every text goes to the Rust library, as it does for any text the
counter declines (non-ASCII, control characters, words over 256 bytes). Tests compare counts with
the Rust tokenizer on random and real text.
"""
from __future__ import annotations

import json
import logging
from typing import Optional

from lingshu_fast.data.tokenizer import QWEN2_PRETOKENIZE_REGEX

logger = logging.getLogger(__name__)

_ASCII_INVARIANT = {"NFC", "NFD", "NFKC", "NFKD"}


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character standing for each byte -> the byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _supported(config: dict) -> Optional[str]:
    """None when the counter is exact for this tokenizer, else why not."""
    for token in config.get("added_tokens", []):
        if token.get("normalized") or token.get("lstrip") or token.get("rstrip") or token.get("single_word"):
            return f"added token {token.get('content')!r} is not matched on the raw text"
    normalizer = config.get("normalizer")
    if normalizer is not None:
        steps = normalizer.get("normalizers", []) if normalizer.get("type") == "Sequence" else [normalizer]
        if any(step.get("type") not in _ASCII_INVARIANT for step in steps):
            return f"normaliser {normalizer.get('type')}"
    pre = config.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if len(steps) != 2 or steps[0].get("type") != "Split" or steps[1].get("type") != "ByteLevel":
        return "pre-tokeniser is not Split + ByteLevel"
    split, byte_level = steps
    if (split.get("pattern") != {"Regex": QWEN2_PRETOKENIZE_REGEX} or split.get("behavior") != "Isolated"
            or split.get("invert")):
        return "split pattern is not Qwen2's"
    if byte_level.get("add_prefix_space") or byte_level.get("use_regex", True):
        return "byte-level pre-tokeniser adds a prefix space or splits itself"
    model = config.get("model") or {}
    if model.get("type") != "BPE" or model.get("dropout") or model.get("byte_fallback"):
        return "model is not a plain BPE"
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "BPE with subword prefixes/suffixes"
    if config.get("truncation") is not None or config.get("padding") is not None:
        return "truncation or padding is set"
    return None


def native_counter(tokenizer):
    """A `lingshu_fast._C.BpeCounter` for `tokenizer` (HF or bare `tokenizers.Tokenizer`), or None."""
    from lingshu_fast.data.packing import load_native

    native = load_native("auto")
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if native is None or not hasattr(native, "BpeCounter") or not hasattr(backend, "to_str"):
        return None
    config = json.loads(backend.to_str())
    why = _supported(config)
    if why is not None:
        logger.info("token counts from the Rust tokenizer only (%s)", why)
        return None
    decode = _byte_decoder()
    tokens, ids = [], []
    for text, token_id in config["model"]["vocab"].items():
        if all(ch in decode for ch in text):
            tokens.append(bytes(decode[ch] for ch in text))
            ids.append(int(token_id))
    if len({t for t in tokens if len(t) == 1}) < 256:
        return None  # a byte without a token: the Rust library would drop it, we could not count it
    merges = []
    for merge in config["model"]["merges"]:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        if all(ch in decode for ch in left + right):
            merges.append((bytes(decode[ch] for ch in left), bytes(decode[ch] for ch in right)))
        else:
            merges.append((b"\xff\xfe-unused", b""))  # keeps the ranks of the others
    added = [t["content"] for t in config.get("added_tokens", [])]
    return native.BpeCounter(tokens, ids, merges, added, bool(config["model"].get("ignore_merges", False)))
