"""The native token counter (csrc/bpe.cpp): every count it gives equals the Rust tokenizer's, it
declines what it cannot count exactly, and it is enabled only for tokenizers of the shape it knows."""
import json
import random

import pytest

from lingshu_fast.data.bpe_count import native_counter
from lingshu_fast.data.packing import load_native
from lingshu_fast.data.tokenizer import TINY_CORPUS, load_tokenizer

pytestmark = pytest.mark.skipif(load_native("auto") is None or not hasattr(load_native("auto"), "BpeCounter"),
                                reason="lingshu_fast._C not built")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def _rust(tok, text):
    return len(tok.backend_tokenizer.encode(text, add_special_tokens=False).ids)


def test_counts_equal_the_rust_tokenizer(tok):
    """Random text over the characters where Qwen2's split regex has its corner cases (contractions
    in any case, runs of spaces/newlines/tabs before words and punctuation, digits, added tokens
    inside words) and the tokenizer's own corpus: the index's lengths, hence packing, rely on
    these counts being exact, so the bar is equality on every text."""
    counter = native_counter(tok)
    assert counter is not None
    rng = random.Random(0)
    alphabet = "abcXYZ019 '\t\n\r.,!?-_()<>|\"sStTrReEvVmMlLdD"
    texts = TINY_CORPUS.read_text().splitlines(keepends=True)
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))) for _ in range(20000)]
    texts += ["".join(rng.choice([" ", "  ", "\n", "\n\n", " \n ", "\t", "word", "'s", "'LL", "x'", "!!", "<|im_end|>",
                                  "<think>", "</answer>", "<|im_start|>", "12", "a.b"]) for _ in range(rng.randint(1, 30)))
              for _ in range(5000)]
    for text in texts:
        assert counter.count(text) == _rust(tok, text), repr(text)


def test_declines_what_it_cannot_count(tok):
    """Non-ASCII text, other control characters and very long words go to the Rust library (-1)."""
    counter = native_counter(tok)
    for text in ["caf\u00e9", "\u4e2d\u6587", "form\x0cfeed", "nul\x00", "x" * 300, "ok <|im_end|> \u00e9"]:
        assert counter.count(text) == -1, repr(text)
    assert counter.count("x" * 200) == _rust(tok, "x" * 200)


@pytest.mark.parametrize("edit", ["normalizer", "regex", "prefix_space", "dropout", "added_lstrip"])
def test_only_known_tokenizer_shapes_get_a_counter(tok, edit):
    """A tokenizer that differs in any step the counter hard-codes must not get one (its counts
    could silently differ from the tokenizer's)."""
    from tokenizers import Tokenizer

    config = json.loads(tok.backend_tokenizer.to_str())
    if edit == "normalizer":
        config["normalizer"] = {"type": "Lowercase"}
    elif edit == "regex":
        config["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] += "|x"
    elif edit == "prefix_space":
        config["pre_tokenizer"]["pretokenizers"][1]["add_prefix_space"] = True
    elif edit == "dropout":
        config["model"]["dropout"] = 0.1
    else:
        config["added_tokens"][0]["lstrip"] = True
    assert native_counter(Tokenizer.from_str(json.dumps(config))) is None
