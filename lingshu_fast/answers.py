"""Lenient answer extraction and matching, shared by the RL verifiers (`lingshu_fast.rl.rewards`)
and the evaluation scorer under `eval.scoring: lenient` (`lingshu_fast.eval.scoring`).

A bottom-layer module: standard library only, nothing from lingshu_fast. `eval.scoring: medevalkit`
(the default) does not use it: `lingshu_fast.eval.medevalkit` restates MedEvalKit's own rules, quirks
included. The rules here start from MedEvalKit's and change them on purpose, so that a reward never
punishes formatting and never rewards text that merely resembles an answer:
- Span: `<answer>…</answer>` is looked at first and `\\boxed{…}` second (MedEvalKit: boxed first).
  Our RL format puts the final answer in the tags, and a `\\boxed{}` inside the reasoning must not win
  over it; a `\\boxed{}` *inside* the tags is still unwrapped. Of several tag pairs the LAST one counts
  (MedEvalKit joins them, which turns "A … C" into an answer no rule accepts); of several `\\boxed{}`
  the last one counts, as in MedEvalKit (mathruler). An unclosed `<answer>` at the very end (a
  generation cut by max_new_tokens) yields the text after it.
- Answer phrases ("the answer is", "answer:", "final answer", "答案：") cut the span to what follows
  the last one, as in MedEvalKit.
- Multiple choice: an explicit letter ("C", "(C)", "C.", "**C**", "answer is (C)") or an option's text
  wins; different letters in one answer mean "no answer" (None), never the first or the last. The
  most-similar-option fallback (difflib ratio on normalised option texts) is opt-in
  (`similar_fallback=True`): lenient evaluation uses it, RL rewards do not, because a policy would
  learn to emit text that is merely similar to an option.
- Yes/no: whole words only (MedEvalKit tests the substring "no", which also fires on "node", "not"
  and "nodule"); a leading "Yes"/"No" decides, else exactly one of them must occur.
All regexes here are linear-time (no nested quantifiers), so they are safe on long responses.
"""
from __future__ import annotations

import difflib
import math
import re
import unicodedata
from typing import Mapping, Optional, Sequence, Union

Options = Union[Mapping[str, str], Sequence[str], None]
DEFAULT_LETTERS = "ABCDEFGHIJ"

# --------------------------------------------------------------------------- spans

_ANSWER_OPEN = "<answer>"
_ANSWER_CLOSE = "</answer>"
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
# The LAST answer phrase wins (MedEvalKit splits on each pattern and keeps the tail).
_ANSWER_PHRASE_RE = re.compile(
    r"(?:\*{0,2}(?:final\s+|correct\s+)?answer\*{0,2}\s*(?:is\s*:?|:|：)\*{0,2}"
    r"|\*\*answer\*\*|答案\s*(?:是|为|:|：))",
    re.IGNORECASE,
)


def _unicode_clean(text: str) -> str:
    """NFKC folds full-width letters/brackets ("（Ｃ）" -> "(C)"); curly quotes and the Unicode
    minus are not folded by NFKC, so they are mapped by hand."""
    text = unicodedata.normalize("NFKC", text)
    return text.translate(_CHAR_MAP)


_CHAR_MAP = str.maketrans({"\u2212": "-", "\u2018": "'", "\u2019": "'", "\u201c": '"',
                           "\u201d": '"', "\u00a0": " ", "\u200b": ""})


def extract_boxed(text: str) -> Optional[str]:
    """Content of the last `\\boxed{…}` (nested braces balanced), or None when there is none or it
    is unclosed."""
    starts = [m.end() for m in _BOXED_RE.finditer(text)]
    stop = len(text)
    for start in reversed(starts):
        # Reached only when every later box is unclosed; then this one, if it closes at all,
        # closes before the next box starts — so each character is scanned once (linear time).
        depth = 1
        for i in range(start, stop):
            ch = text[i]
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
        stop = start
    return None


def extract_tag(text: str, tag: str = "answer") -> Optional[str]:
    """Content of the last `<tag>…</tag>`; a trailing unclosed `<tag>` gives the text after it."""
    open_tag, close_tag = f"<{tag}>", f"</{tag}>"
    start = text.rfind(open_tag)
    if start < 0:
        return None
    end = text.find(close_tag, start + len(open_tag))
    if end < 0:
        return text[start + len(open_tag):].strip()
    return text[start + len(open_tag):end].strip()


def extract_answer_span(text: Optional[str]) -> str:
    """The part of a response that holds the answer: the last `<answer>` span (a `\\boxed{}` inside
    it unwrapped), else the last `\\boxed{}`, else the whole text; Unicode-cleaned and stripped."""
    if not text:
        return ""
    text = _unicode_clean(text)
    span = extract_tag(text)
    if span is not None:
        boxed = extract_boxed(span)
        return _unwrap_latex_text(boxed) if boxed is not None else span
    boxed = extract_boxed(text)
    return _unwrap_latex_text(boxed) if boxed is not None else text.strip()


_LATEX_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textit)\s*\{([^{}]*)\}")


def _unwrap_latex_text(span: str) -> str:
    """'\\text{C}' -> 'C': models often wrap a boxed word in a text command."""
    return _LATEX_TEXT_RE.sub(lambda m: m.group(1), span).strip()


def strip_answer_phrase(span: str) -> str:
    """What follows the last answer phrase ("The answer is (C)." -> "(C)."), else the span itself."""
    last = None
    for last in _ANSWER_PHRASE_RE.finditer(span):
        pass
    return span[last.end():].strip() if last is not None else span.strip()


def final_answer(text: Optional[str]) -> str:
    """extract_answer_span + strip_answer_phrase: the short answer a matcher compares."""
    return strip_answer_phrase(extract_answer_span(text))


# --------------------------------------------------------------------------- normalisation

# "a" only before another word: a trailing "a" is a letter ("hepatitis a", "type a"), not an article.
_ARTICLES_RE = re.compile(r"\b(?:an|the)\b|\ba\b(?=\s+\S)")


def normalize_text(s: Optional[str]) -> str:
    """Lower-case, NFKC, punctuation -> space, drop articles a/an/the (unless nothing else is
    left), collapse whitespace.
    Punctuation becomes a space rather than vanishing so that "2.5" and "25" stay different."""
    if not s:
        return ""
    s = _unicode_clean(s).lower()
    s = "".join(" " if unicodedata.category(ch).startswith(("P", "S")) else ch for ch in s)
    without_articles = _ARTICLES_RE.sub(" ", s)
    # Keep a lone article ("A" as a blood group or an option word) instead of normalising to "".
    return " ".join((without_articles if without_articles.strip() else s).split())


# --------------------------------------------------------------------------- multiple choice


def options_as_dict(options: Options, letters: str = DEFAULT_LETTERS) -> dict[str, str]:
    """Options as {letter: text}. A list is lettered in order; dict keys are upper-cased."""
    if options is None:
        return {}
    if isinstance(options, Mapping):
        return {str(k).strip().upper(): str(v) for k, v in options.items()}
    if isinstance(options, str):
        raise TypeError("options must be a dict or a list of strings, not one string")
    if len(options) > len(letters):
        raise ValueError(f"{len(options)} options but only {len(letters)} letters ({letters})")
    return {letters[i]: str(v) for i, v in enumerate(options)}


def _strip_option_prefix(text: str) -> str:
    """'A. Pneumonia' / '(A) Pneumonia' -> 'Pneumonia' (option lists often carry their letter)."""
    return re.sub(r"^\s*\(?[A-Za-z]\s*[.):]\s+", "", text)


# A bare letter answer: "C", "(C)", "C.", "C)", "C:", "**C**", "[C]", optionally followed by the
# option text after a separator ("C. Pneumonia", "C) Pneumonia").
_LEAD_LETTER_RE = re.compile(r"^[\s*_\"'`\[(]*([A-Za-z])[\s*_\"'`\])]*(?:$|[.):,;-]\s*(.*)$)", re.DOTALL)
# Right after an answer phrase: one capital letter as a word ("C because …") or a list of them
# ("A and C", "A, C", "(A) or (C)").
_PHRASED_LEAD_RE = re.compile(r"^[\s*(\[]*([A-Z])(?![\w'])")
_LETTER_LIST_RE = re.compile(
    r"^[\s*(\[]*([A-Z])[\s*)\]]*(?:(?:,|/|&|\band\b|\bor\b)[\s*(\[]*([A-Z])[\s*)\]]*)+")
# Letters pointed at inside prose: "option C", "choice (C)", "(C)".
_POINTED_LETTER_RE = re.compile(r"\b(?i:option|choice)\s*\(?([A-Z])\)?(?![\w'])|\(([A-Z])\)")
# A standalone capital letter; see _is_word_not_letter for "A"/"I" used as words.
_STANDALONE_LETTER_RE = re.compile(r"(?<![\w'-])([A-Z])(?![\w'-])")


# "A and C", "A is wrong", "A or B": after these words a capital A/I is an option, not a word.
_VERBS_AFTER_LETTER = frozenset({"and", "or", "is", "was", "seems", "looks", "would", "could", "might"})


def _is_word_not_letter(text: str, start: int, letter: str) -> bool:
    """'A' opening a sentence before a lower-case word is the article ("A mass is seen"); 'I'
    before a lower-case word is the pronoun ("I think"). Mid-sentence "A and C" stays letters."""
    nxt = re.match(r"\s+([a-z]+)", text[start + 1:])
    followed_by_word = nxt is not None and nxt.group(1) not in _VERBS_AFTER_LETTER
    if letter == "I":
        return followed_by_word or text[start + 1:start + 2] == "'"
    if letter == "A" and followed_by_word:
        before = text[:start].rstrip(" *_\"'`")
        return not before or before[-1] in ".!?:\n"
    return False


def _one_letter(found: Sequence[str], allowed: str) -> tuple[Optional[str], bool]:
    """(letter, decided): decided=True once letters were seen — several different ones give None."""
    found = [c for c in found if c in allowed]
    if not found:
        return None, False
    return (found[0], True) if len(set(found)) == 1 else (None, True)


def _match_option_text(answer: str, opts: dict[str, str]) -> Optional[str]:
    """Letter whose option text equals the answer, else the one option whose text occurs in it
    (ignoring options contained in a longer matching option: "viral pneumonia" beats "pneumonia")."""
    norm_answer = normalize_text(answer)
    if not norm_answer:
        return None
    norm_opts = {k: normalize_text(_strip_option_prefix(v)) for k, v in opts.items()}
    exact = [k for k, v in norm_opts.items() if v and v == norm_answer]
    if len(exact) == 1:
        return exact[0]
    padded = f" {norm_answer} "
    inside = [k for k, v in norm_opts.items() if v and f" {v} " in padded]
    inside = [k for k in inside
              if not any(o != k and norm_opts[k] in norm_opts[o] for o in inside)]
    return inside[0] if len(inside) == 1 else None


def most_similar_option(answer: str, opts: dict[str, str]) -> Optional[str]:
    """Letter of the option with the highest difflib ratio to the answer (MedEvalKit's fallback);
    None when nothing is similar at all. Ties go to the earliest letter, as in MedEvalKit."""
    norm_answer = normalize_text(answer)
    best, best_ratio = None, 0.0
    for k, v in opts.items():
        ratio = difflib.SequenceMatcher(None, normalize_text(_strip_option_prefix(v)), norm_answer).ratio()
        if ratio > best_ratio:
            best, best_ratio = k, ratio
    return best


def _letter_from_lead(answer: str, opts: dict[str, str], allowed: str, phrased: bool):
    """(letter, decided) from an answer that starts with a bare letter ("C", "(C)", "C. text")."""
    m = _LEAD_LETTER_RE.match(answer)
    if not m or m.group(1).upper() not in allowed:
        return None, False
    letter, rest = m.group(1).upper(), (m.group(2) or "").strip()
    # Lower case counts only alone or after an answer phrase ("answer: c"), not "a) text" prose.
    if not (m.group(1).isupper() or phrased or not rest):
        return None, False
    if rest and opts:
        # "C. Pneumonia" where Pneumonia is option A: letter and text disagree -> no answer. Only
        # an exact option text on the first line counts; later prose may discuss other options.
        first_line = normalize_text(rest.splitlines()[0])
        named = [k for k, v in opts.items() if normalize_text(_strip_option_prefix(v)) == first_line]
        if named and letter not in named:
            return None, True
    return letter, True


def extract_choice(text: Optional[str], options: Options = None, *, letters: str = DEFAULT_LETTERS,
                   similar_fallback: bool = False) -> Optional[str]:
    """The chosen option letter (upper case), or None when there is no single clear choice.
    Order: an option's exact text -> a list of letters ("A, C": None unless all equal) -> a bare
    letter as the whole answer ("(C)", "C. text") -> a letter word right after an answer phrase -> an option's text inside the answer -> letters pointed
    at ("option C", "(C)") -> standalone capitals -> (opt-in) the most similar option.
    Letters outside the options (or outside `letters` when options is None) are ignored."""
    opts = options_as_dict(options, letters)
    allowed = "".join(opts) if opts else letters
    span = extract_answer_span(text)
    if not span:
        return None
    answer = strip_answer_phrase(span)
    phrased = answer != span.strip()
    norm_answer = normalize_text(answer)
    exact = [k for k, v in opts.items() if norm_answer and normalize_text(_strip_option_prefix(v)) == norm_answer]
    if len(exact) == 1:
        return exact[0]
    listed = _LETTER_LIST_RE.match(answer)
    if listed:
        letter, decided = _one_letter([g for g in listed.groups() if g], allowed)
        if decided:
            return letter
    letter, decided = _letter_from_lead(answer, opts, allowed, phrased)
    if decided:
        return letter
    if phrased:
        lead = _PHRASED_LEAD_RE.match(answer)
        if lead and lead.group(1) in allowed and not _is_word_not_letter(answer, lead.start(1), lead.group(1)):
            return lead.group(1)
    if opts:
        by_text = _match_option_text(answer, opts)
        if by_text is not None:
            return by_text
    for source in ([answer, span] if phrased else [span]):
        letter, decided = _one_letter([a or b for a, b in _POINTED_LETTER_RE.findall(source)], allowed)
        if decided:
            return letter
    standalone = [m.group(1) for m in _STANDALONE_LETTER_RE.finditer(answer)
                  if not _is_word_not_letter(answer, m.start(1), m.group(1))]
    letter, decided = _one_letter(standalone, allowed)
    if decided:
        return letter
    if similar_fallback and opts:
        return most_similar_option(answer, opts)
    return None


def gold_choice(answer: str, options: Options, letters: str = DEFAULT_LETTERS) -> Optional[str]:
    """The gold letter of an item whose `answer` is a letter ("C", "(C)") or an option's text;
    without options only a letter answer (within `letters`) has one."""
    opts = options_as_dict(options, letters)
    ans = _unicode_clean(str(answer)).strip().strip("().").strip()
    if len(ans) == 1 and ans.upper() in (opts or letters):
        return ans.upper()
    return _match_option_text(str(answer), opts) if opts else None


# --------------------------------------------------------------------------- yes / no

_YES_WORDS = ("yes", "yeah", "yep", "true", "correct", "present")
_NO_WORDS = ("no", "nope", "false", "incorrect", "absent", "none")
_BOTH_RE = re.compile(r"\b(?:yes|no)\s*(?:and|or|/)\s*(?:yes|no)\b")
_LEAD_WORD_RE = re.compile(r"^[\s*_\"'`(\[]*([a-z]+)")


def extract_yes_no(text: Optional[str]) -> Optional[str]:
    """'yes', 'no' or None. A leading yes/no word decides ("No evidence of …", "Yes, there is");
    Chinese 是/否/不; otherwise exactly one of the words yes/no must occur in the answer."""
    answer = final_answer(text)
    if not answer:
        return None
    if answer.startswith(("否", "不")):
        return "no"
    if answer.startswith(("是", "对", "有")):
        return "yes"
    low = answer.lower()
    if _BOTH_RE.search(low):  # "yes and no", "yes/no": hedging, not an answer
        return None
    lead = _LEAD_WORD_RE.match(low)
    if lead and lead.group(1) in _YES_WORDS:
        return "yes"
    if lead and lead.group(1) in _NO_WORDS:
        return "no"
    has_yes = re.search(r"\byes\b", low) is not None
    has_no = re.search(r"\bno\b", low) is not None
    if has_yes != has_no:
        return "yes" if has_yes else "no"
    return None


def normalize_yes_no(answer: str) -> Optional[str]:
    """A gold yes/no label ('Yes', 'no.', '是', '否') as 'yes' | 'no', else None."""
    label = normalize_text(answer)
    if label in ("yes", "no"):
        return label
    return {"是": "yes", "否": "no"}.get(str(answer).strip())


# --------------------------------------------------------------------------- numbers

_NUMBER_RE = re.compile(
    r"(?<![\w.])([-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+)(?:[eE]([-+]?\d+))?"
)


def extract_number(text: Optional[str]) -> Optional[float]:
    """The answer as a float: thousands commas dropped ("1,200 mg" -> 1200), units ignored,
    "45%" -> 45.0 (the number as written; no fractions, so "120/80" is 120). In an `<answer>`/`\\boxed{}` span or after
    an answer phrase the FIRST number counts ("5 mm, not 6"); in free text the LAST one (reasoning
    comes first, the result last)."""
    span = extract_answer_span(text)
    if not span:
        return None
    answer = strip_answer_phrase(span)
    explicit = answer != span.strip() or (text is not None and ("<answer>" in text or "boxed" in text))
    matches = list(_NUMBER_RE.finditer(answer))
    if not matches:
        return None
    m = matches[0] if explicit else matches[-1]
    value = float(m.group(1).replace(",", "") + (f"e{m.group(2)}" if m.group(2) else ""))
    return value if math.isfinite(value) else None
