"""Answer extraction shared by the RL verifiers and the eval scorer (lingshu_fast/answers.py).

Each table row pins one way a model writes an answer; a wrong row means a reward or an eval
accuracy silently counts a wrong answer as right (or the reverse). Exact string results: no tolerance.
"""
import pytest

from lingshu_fast.answers import (
    extract_answer_span,
    extract_boxed,
    extract_choice,
    extract_number,
    extract_yes_no,
    final_answer,
    gold_choice,
    normalize_text,
    normalize_yes_no,
    options_as_dict,
)

OPTS = {"A": "Pneumonia", "B": "Viral pneumonia", "C": "Tuberculosis", "D": "Lung cancer"}

CHOICE_TABLE = [
    ("C", "C"), ("(C)", "C"), ("C.", "C"), ("C)", "C"), ("C:", "C"), ("**C**", "C"), ("[C]", "C"),
    ("the answer is (C)", "C"), ("The answer is C.", "C"), ("Answer: C", "C"), ("**Answer:** C", "C"),
    ("Final Answer: **D**", "D"), ("答案：B", "B"), ("（Ｃ）", "C"),          # full-width letters
    ("I think A is wrong, the answer is C", "C"),                              # letters in prose
    ("The answer is C because it resembles viral pneumonia", "C"),             # letter beats text after it
    ("Tuberculosis", "C"), ("tuberculosis.", "C"), ("The answer is: lung cancer.", "D"),  # text for letter
    ("viral pneumonia", "B"),              # "pneumonia" inside "viral pneumonia" must not make it ambiguous
    ("It is most likely tuberculosis.", "C"),
    ("C. Tuberculosis", "C"), ("C. Pneumonia", None),                          # letter and text disagree
    ("**C. Tuberculosis**", "C"), ("Answer: C. Tuberculosis", "C"),
    ("A. Pneumonia\n\nViral pneumonia and tuberculosis are less likely.", "A"),  # prose after the choice
    ("The correct answer is option C", "C"), ("Therefore (B) is correct, not (A).", None),
    ("The answer is A and C", None), ("A, C", None), ("Both A and C are correct", None),  # several letters
    ("A and A", "A"),                                                          # the same letter twice is one
    ("\\boxed{C}", "C"), ("\\boxed{\\text{C}}", "C"), ("so \\boxed{B} ... finally \\boxed{C}", "C"),
    ("<think>B looks right</think><answer>C</answer>", "C"),                   # tags beat prose
    ("<think>\\boxed{B}</think><answer>C</answer>", "C"),                      # tags beat a boxed in thought
    ("<answer>\\boxed{C}</answer>", "C"),
    ("<answer>A</answer> then <answer>D</answer>", "D"),                       # last tag pair counts
    ("option C", "C"), ("I'd choose (B).", "B"),
    ("A mass is seen in the apex.", None),         # the article "A" is not a choice
    ("E", None),                                   # letter outside the options
    ("", None), (None, None), ("   ", None), ("I don't know", None),
]


@pytest.mark.parametrize("text,expected", CHOICE_TABLE)
def test_extract_choice_table(text, expected):
    """Pins MedEvalKit-style letter rules; several different letters must never pick one."""
    assert extract_choice(text, OPTS) == expected


def test_extract_choice_list_options_and_no_options():
    """A list of options is lettered A, B, …; without options any letter in `letters` counts."""
    assert extract_choice("Tuberculosis", ["Pneumonia", "Tuberculosis"]) == "B"
    assert extract_choice("C", ["x", "y"]) is None
    assert extract_choice("The answer is (G).", None) == "G"
    assert extract_choice("The answer is (K).", None) is None


def test_similar_fallback_is_opt_in():
    """The difflib fallback (eval only) picks the closest option for a misspelling; RL keeps None
    so a policy cannot be rewarded for text that merely resembles an option."""
    assert extract_choice("tubercolosis", OPTS) is None
    assert extract_choice("tubercolosis", OPTS, similar_fallback=True) == "C"
    assert extract_choice("", OPTS, similar_fallback=True) is None
    assert extract_choice("The answer is A and C", OPTS, similar_fallback=True) is None


def test_option_lists_with_letter_prefixes():
    """MedEvalKit-style options often read 'A. Pneumonia': the prefix is not part of the text."""
    opts = ["A. Pneumonia", "B. Tuberculosis"]
    assert extract_choice("Tuberculosis", opts) == "B"
    assert gold_choice("B", opts) == "B"
    assert gold_choice("Tuberculosis", opts) == "B"
    assert gold_choice("(a)", opts) == "A"
    assert gold_choice("Asthma", opts) is None


YESNO_TABLE = [
    ("Yes.", "yes"), ("YES", "yes"), ("yes, there is", "yes"), ("No evidence of pneumothorax", "no"),
    ("\u201cYes\u201d", "yes"), ("**No**", "no"), ("是的", "yes"), ("否", "no"), ("不是", "no"),
    ("There is no nodule.", "no"), ("The answer is yes", "yes"), ("<answer>no</answer>", "no"),
    ("\\boxed{Yes}", "yes"), ("Nodule present in the node.", None),  # MedEvalKit's substring "no" fires here
    ("yes and no", None), ("not sure", None), ("", None), (None, None),
]


@pytest.mark.parametrize("text,expected", YESNO_TABLE)
def test_extract_yes_no_table(text, expected):
    """Whole-word yes/no; a leading word decides; both or neither -> None."""
    assert extract_yes_no(text) == expected


def test_normalize_yes_no_labels():
    assert normalize_yes_no("Yes") == "yes" and normalize_yes_no("no.") == "no"
    assert normalize_yes_no("是") == "yes" and normalize_yes_no("left lung") is None


NUMBER_TABLE = [
    ("1,200 mg", 1200.0), ("45%", 45.0), ("The answer is 5 mm, not 6", 5.0),
    ("it grows from 3 to 7", 7.0), ("\\boxed{-2.5e-3}", -2.5e-3), ("\u22124 cm", -4.0),
    ("<answer>about 12.5 cm</answer>", 12.5), ("T2 weighted", None), ("", None), (None, None),
    ("0.5", 0.5), (".5", 0.5), ("3,4 or 5", 5.0),
]


@pytest.mark.parametrize("text,expected", NUMBER_TABLE)
def test_extract_number_table(text, expected):
    """Units and thousands commas ignored; first number in an explicit answer, else the last."""
    assert extract_number(text) == expected


def test_normalize_text():
    """Lower case, NFKC, punctuation -> space, articles dropped; '2.5' must stay unlike '25'."""
    assert normalize_text("The Left  Lung!") == "left lung"
    assert normalize_text("ＡＢＣ, an apple") == "abc apple"
    assert normalize_text("2.5 cm") != normalize_text("25 cm")
    assert normalize_text("X-ray") == "x ray"
    assert normalize_text(None) == "" and normalize_text("...") == ""
    assert normalize_text("A") == "a" and normalize_text("type A") == "type a"  # a letter, not an article
    assert normalize_text("A mass in the liver") == "mass in liver"


def test_spans():
    """Nested braces balance; the last boxed counts; unclosed tags/boxes behave predictably."""
    assert extract_boxed("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{a} \\boxed{x^{2}}") == "x^{2}"
    assert extract_boxed("\\boxed{unclosed") is None
    assert extract_boxed("\\boxed{a} \\boxed{b") == "a"          # a later unclosed box is skipped
    assert extract_boxed("\\boxed{a \\boxed{b} c") == "b"
    assert extract_answer_span("<think>t</think><answer>left lung") == "left lung"  # cut by max tokens
    assert extract_answer_span("plain text ") == "plain text"
    assert final_answer("Reasoning… so the final answer is: left lung") == "left lung"


def test_options_as_dict_errors():
    with pytest.raises(TypeError):
        options_as_dict("ABCD")
    with pytest.raises(ValueError):
        options_as_dict([str(i) for i in range(11)])
    assert options_as_dict({"a": "x"}) == {"A": "x"}


def test_long_response_is_fast():
    """Linear-time rules: a 200 KB adversarial response must not backtrack (budget 1 s on 2 cores)."""
    import time
    text = "(" * 50_000 + "A and " * 20_000 + "\\boxed{" * 1000
    t0 = time.perf_counter()
    extract_choice(text, OPTS, similar_fallback=True)
    extract_yes_no(text)
    extract_number(text)
    assert time.perf_counter() - t0 < 1.0
