"""Tokenizers: any local Hugging Face tokenizer folder, or the embedded tiny one ("tiny").

The tiny tokenizer is a real byte-level BPE built the way Qwen2's is (NFC normaliser, Qwen2's
pre-tokenisation regex, byte-level alphabet), trained deterministically with the `tokenizers`
library on a small medical corpus (`assets/tiny_tokenizer/corpus.txt`), then given Qwen2.5-VL's
special tokens in Qwen's order (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, ..., `<|vision_start|>`,
`<|vision_end|>`, `<|vision_pad|>`, `<|image_pad|>`, `<|video_pad|>`) and the reasoning tags
`<think> </think> <answer> </answer>` as plain added tokens. It carries Qwen2-VL's chat template so an
HF export of a demo model works with `apply_chat_template`.

The built files are committed under `lingshu_fast/assets/tiny_tokenizer/`; `build_tiny_tokenizer(dir)`
rebuilds them and a test checks that the rebuild equals the committed files (vocab, merges, added
tokens), so the assets cannot drift from the code that makes them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

TINY_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny_tokenizer"
TINY_CORPUS = TINY_DIR / "corpus.txt"

# Same pattern as transformers' Qwen2Tokenizer (contractions, letters, single digits, punctuation runs,
# newlines): it decides where BPE merges may happen, so it must match for Qwen-like token boundaries.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2.5-VL's special tokens, in the order of its vocabulary (ids 151643..151656 in the real one).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# Added as ordinary (non-special) tokens, as in reasoning fine-tunes: decode keeps them.
REASONING_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]

# BPE vocabulary size asked of the trainer (bytes + merges); the special and reasoning tokens come on
# top, so the full tiny vocabulary is 1024.
TINY_BPE_VOCAB_SIZE = 1024 - len(QWEN_SPECIAL_TOKENS) - len(REASONING_TOKENS)

# Qwen2-VL / Qwen2.5-VL's chat template (as shipped in their chat_template.json).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class TokenizerError(ValueError):
    """A tokenizer could not be loaded; the message says which path and what to do."""


def _train_tiny_backend():
    """The `tokenizers.Tokenizer` of the tiny tokenizer, trained from the corpus (deterministic)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BPE_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    lines = TINY_CORPUS.read_text(encoding="utf-8").splitlines(keepends=True)
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in REASONING_TOKENS])
    return tok


def build_tiny_tokenizer(out_dir: Union[str, Path]) -> Path:
    """Train the tiny tokenizer and write it as an HF tokenizer folder; returns the folder."""
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=_train_tiny_backend(),
        eos_token="<|im_end|>",  # as Qwen2.5-VL-Instruct: generation stops at the end of a turn
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    hf_tok.chat_template = QWEN2_VL_CHAT_TEMPLATE
    hf_tok.save_pretrained(str(out_dir))
    # Name Qwen2's class, not the generic backend: transformers 4.x/5.x and vLLM then load the folder
    # (and an HF export that copies it) as they load Qwen2.5-VL's own tokenizer, from tokenizer.json.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "Qwen2Tokenizer"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out_dir


def load_tokenizer(path_or_name: Union[str, Path]):
    """"tiny" -> the embedded demo tokenizer; otherwise a local HF tokenizer folder (never the hub)."""
    from transformers import AutoTokenizer

    if str(path_or_name) == "tiny":
        path = TINY_DIR
        if not (path / "tokenizer.json").is_file():  # an install without the assets: build them once
            build_tiny_tokenizer(path)
    else:
        path = Path(path_or_name).expanduser()
        if not path.is_dir():
            raise TokenizerError(
                f"data.tokenizer={path_or_name!r}: no such folder; give a local Hugging Face tokenizer "
                f"folder (with tokenizer.json or vocab.json+merges.txt) or 'tiny' for the demo tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - transformers raises many types; the user needs one message
        raise TokenizerError(f"data.tokenizer={str(path_or_name)!r}: cannot load a tokenizer from {path}: "
                             f"{type(err).__name__}: {err}") from err
    special_token_ids(tok)  # fail here, at start-up, if the Qwen2.5-VL tokens are missing
    return tok


def special_token_ids(tok) -> dict[str, int]:
    """Ids of the tokens the data path and the model need; raises if the tokenizer lacks one."""
    names = {
        "image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
        "im_start_id": "<|im_start|>", "im_end_id": "<|im_end|>", "endoftext_id": "<|endoftext|>",
    }
    vocab = tok.get_vocab()
    missing = [t for t in names.values() if t not in vocab]
    if missing:
        raise TokenizerError(f"tokenizer {getattr(tok, 'name_or_path', '?')!r} lacks the Qwen2.5-VL special "
                             f"tokens {missing}; use a Qwen2-VL/Qwen2.5-VL tokenizer folder")
    ids = {key: int(vocab[t]) for key, t in names.items()}
    ids["eos_token_id"] = int(tok.eos_token_id) if tok.eos_token_id is not None else ids["im_end_id"]
    ids["pad_token_id"] = int(tok.pad_token_id) if tok.pad_token_id is not None else ids["endoftext_id"]
    return ids


def tokenizer_fingerprint(folder: Union[str, Path]) -> dict:
    """What makes two tokenizer folders equivalent: vocab, merges, added tokens, template (not bytes,
    so a different `tokenizers` version that serialises differently still compares equal)."""
    folder = Path(folder)
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    added = sorted((a["id"], a["content"], bool(a["special"])) for a in data["added_tokens"])
    template = config.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return {"vocab": data["model"]["vocab"], "merges": merges, "added": added, "chat_template": template,
            "tokenizer_class": config.get("tokenizer_class"), "eos": config.get("eos_token"),
            "pad": config.get("pad_token")}


if __name__ == "__main__":  # python -m lingshu_fast.data.tokenizer: rebuild the committed assets
    print(build_tiny_tokenizer(TINY_DIR))
