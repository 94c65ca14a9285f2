"""Tiny tokenizer (assets equal a rebuild, Qwen special tokens) and the ChatML template (text and ids
equal to Qwen2-VL's jinja template + the processor's pad expansion; loss masks)."""
import json

import numpy as np
import pytest

from lingshu_fast.data.template import IGNORE_INDEX, ChatTemplate, TemplateError
from lingshu_fast.data.tokenizer import (
    QWEN_SPECIAL_TOKENS,
    TINY_DIR,
    TokenizerError,
    build_tiny_tokenizer,
    load_tokenizer,
    special_token_ids,
    tokenizer_fingerprint,
)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def template(tok):
    return ChatTemplate(tok)


CONVERSATIONS = [
    [{"role": "user", "content": "<image>Is there a lesion in this image? Answer yes or no."},
     {"role": "assistant", "content": "yes"}],
    [{"role": "system", "content": "You are a radiologist."},
     {"role": "user", "content": "Compare <image> and <image>: which one shows a lesion?"},
     {"role": "assistant", "content": "The first image shows a lesion."},
     {"role": "user", "content": "What does CT stand for?"},
     {"role": "assistant", "content": "<think> acronym </think><answer> Computed tomography. </answer>"}],
    [{"role": "user", "content": "How many chambers does the human heart have?"},
     {"role": "assistant", "content": "\n Four.\n"}],
]
IMAGE_TOKENS = [[5], [3, 7], []]


def _as_parts(messages):
    """`<image>` markers -> HF content parts, the input Qwen2-VL's jinja template understands."""
    out = []
    for m in messages:
        pieces = m["content"].split("<image>")
        parts = [{"type": "text", "text": pieces[0]}]
        for piece in pieces[1:]:
            parts += [{"type": "image"}, {"type": "text", "text": piece}]
        out.append({"role": m["role"], "content": [p for p in parts if p.get("type") == "image" or p["text"]]})
    return out


def _expand_pads(text, counts):
    pieces = text.split("<|image_pad|>")
    assert len(pieces) - 1 == len(counts)
    return pieces[0] + "".join("<|image_pad|>" * n + p for n, p in zip(counts, pieces[1:]))


def test_committed_assets_equal_a_rebuild(tmp_path):
    """Pins drift between the committed tokenizer files and the code that builds them (vocab, merges,
    added tokens and template compared, not bytes, so a tokenizers release that serialises differently
    does not fail it). Also pins determinism: the build is run from scratch here."""
    build_tiny_tokenizer(tmp_path)
    assert tokenizer_fingerprint(tmp_path) == tokenizer_fingerprint(TINY_DIR)
    assert sum(p.stat().st_size for p in TINY_DIR.iterdir()) < 200_000


def test_special_tokens_follow_qwen_order(tok):
    """The Qwen2.5-VL special tokens must exist, be single tokens, and keep Qwen's relative order
    (image_pad = vision_start + 3, as in the real vocabulary), so configs that assume it work."""
    ids = special_token_ids(tok)
    vocab = tok.get_vocab()
    assert [vocab[t] for t in QWEN_SPECIAL_TOKENS] == list(range(vocab[QWEN_SPECIAL_TOKENS[0]],
                                                               vocab[QWEN_SPECIAL_TOKENS[0]] + 14))
    assert ids["image_token_id"] == ids["vision_start_token_id"] + 3
    assert ids["eos_token_id"] == ids["im_end_id"] and ids["pad_token_id"] == ids["endoftext_id"]
    assert len(tok) == 1024
    assert type(tok).__name__.startswith("Qwen2Tokenizer")  # loads as Qwen's own class (HF exports, vLLM)
    for t in ["<think>", "</answer>", "<|image_pad|>"]:
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1
    text = "Findings: a well circumscribed hyperdense nodule, 12 mm. Ünïcode ok 肺"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: any text round-trips


def test_tiny_tokenizer_splits_like_qwen2(tok):
    """Our pre-tokeniser must equal transformers' Qwen2Tokenizer's (same regex, NFC, byte level):
    built with our vocab and merges, Qwen2Tokenizer must give the same ids on tricky text."""
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    data = json.loads((TINY_DIR / "tokenizer.json").read_text())
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    qwen = Qwen2Tokenizer(vocab=data["model"]["vocab"], merges=merges)
    for text in ["The patient's BP is 120/80 mmHg.\n\n  Next line", "a   b\t\tc\r\n1234 x-ray's", "Ångström café"]:
        assert qwen(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]


def test_load_tokenizer_errors(tmp_path):
    """A missing folder, or a tokenizer without Qwen's vision tokens, must fail at start-up with a
    message naming the path, not deep inside the loader."""
    with pytest.raises(TokenizerError, match="no such folder"):
        load_tokenizer(tmp_path / "nope")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    plain = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    plain.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=plain).save_pretrained(str(tmp_path / "plain"))
    with pytest.raises(TokenizerError, match="lacks the Qwen2.5-VL special tokens"):
        load_tokenizer(tmp_path / "plain")


@pytest.mark.parametrize("case", range(len(CONVERSATIONS)))
def test_render_equals_qwen2_vl_jinja(tok, template, case):
    """Parity goal: our rendering equals Qwen2-VL's chat template (run by transformers' jinja) followed
    by the processor's expansion of each <|image_pad|>, as text AND as token ids (ids from one
    tokenizer call on the whole text, as the processor does)."""
    messages, counts = CONVERSATIONS[case], IMAGE_TOKENS[case]
    reference = _expand_pads(tok.apply_chat_template(_as_parts(messages), tokenize=False), counts)
    ids, _ = template.render(messages, counts)
    assert template.render_text(messages, counts) == reference
    assert ids.tolist() == tok(reference, add_special_tokens=False)["input_ids"]
    prompt_ref = _expand_pads(tok.apply_chat_template(_as_parts(messages[:-1]), tokenize=False,
                                                      add_generation_prompt=True), counts)
    prompt = template.render_prompt(messages[:-1], counts)
    assert tok.decode(prompt) == prompt_ref and prompt_ref.endswith("<|im_start|>assistant\n")


def test_render_handwritten_expected_text(template):
    """Independent of the jinja string: the documented Qwen2.5-VL layout, written out by hand."""
    text = template.render_text(CONVERSATIONS[0], [2])
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\n<|vision_start|><|image_pad|><|image_pad|><|vision_end|>"
                    "Is there a lesion in this image? Answer yes or no.<|im_end|>\n"
                    "<|im_start|>assistant\nyes<|im_end|>\n")
    custom = ChatTemplate(template.tokenizer, system_prompt="Be brief.")
    assert custom.render_text(CONVERSATIONS[2]).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_labels_cover_assistant_content_and_im_end_only(tok, template):
    """Loss-mask bugs silently train on prompts or on image pads: labels must be exactly the assistant
    contents each followed by <|im_end|>; the '\\n' after <|im_end|>, headers, system, user and vision
    tokens are -100; labels are not shifted (label[i] == input_ids[i] where trained)."""
    messages, counts = CONVERSATIONS[1], IMAGE_TOKENS[1]
    ids, labels = template.render(messages, counts)
    trained = labels != IGNORE_INDEX
    assert (labels[trained] == ids[trained]).all()
    # Contiguous trained runs == one per assistant turn, each decoding to content + <|im_end|>.
    edges = np.flatnonzero(np.diff(np.concatenate([[0], trained.astype(int), [0]])))
    runs = [tok.decode(ids[a:b]) for a, b in zip(edges[::2], edges[1::2])]
    assistant = [m["content"] for m in messages if m["role"] == "assistant"]
    assert runs == [c + "<|im_end|>" for c in assistant]
    ids_map = special_token_ids(tok)
    vision = np.isin(ids, [ids_map["image_token_id"], ids_map["vision_start_token_id"], ids_map["vision_end_token_id"]])
    assert vision.sum() == sum(counts) + 2 * len(counts) and not trained[vision].any()


def test_image_marker_inside_assistant_is_never_trained(template):
    """An image in an assistant turn (rare, legal) must not make its pads loss targets."""
    ids, labels = template.render([{"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": "see <image> here"}], [4])
    pad = template.ids["image_token_id"]
    assert (ids == pad).sum() == 4 and (labels[ids == pad] == IGNORE_INDEX).all()
    assert (labels != IGNORE_INDEX).sum() > 0


def test_render_rejects_bad_input(template):
    """Count mismatches must be an error, not a silently misaligned image."""
    with pytest.raises(TemplateError, match="markers"):
        template.render(CONVERSATIONS[0], [])
    with pytest.raises(TemplateError, match="role"):
        template.render([{"role": "doctor", "content": "x"}], [])
    with pytest.raises(TemplateError, match="at least one token"):
        template.render(CONVERSATIONS[0], [0])


def test_render_many_equals_render(template):
    """The batched start-up path (Rust tokenizer called directly) must give exactly render()'s ids and
    labels, and report a bad item as its TemplateError without spoiling the others."""
    items = list(zip(CONVERSATIONS, IMAGE_TOKENS)) + [(CONVERSATIONS[0], [])]
    results = template.render_many(items)
    for (messages, counts), result in zip(items[:-1], results[:-1]):
        ids, labels = template.render(messages, counts)
        assert np.array_equal(result[0], ids) and np.array_equal(result[1], labels)
    assert isinstance(results[-1], TemplateError)
