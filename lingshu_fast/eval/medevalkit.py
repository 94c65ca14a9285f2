"""MedEvalKit's rule-based scoring, restated rule for rule (`eval.scoring: medevalkit`, the default).

Lingshu's published table was scored by MedEvalKit (alibaba-damo-academy/MedEvalKit: `utils/utils.py`,
`utils/<BENCH>/<BENCH>.py`, `utils/MMMU/eval_utils.py`, and mathruler's `extract_boxed_content`).
This module gives the same verdict on every response, quirks included, so our numbers are its numbers:

- `parse_response`: lower-case; if the substring "boxed" occurs anywhere, the content of the LAST
  `\\boxed{` (balanced braces, stripped), or the literal text "None" when there is none or it never
  closes; else, if "<answer>" occurs, every closed `<answer>…</answer>` span joined by one space;
  then, for each answer phrase in MedEvalKit's order, the text after its last occurrence (unstripped).
- multiple choice (`judge_multi_choice`): lower-case; a bare letter as the first paragraph, or as the
  text before the first "." of the last paragraph, replaces the response; `parse_response`; drop
  newlines; the "head" is the text before the first "." and after the last ":" of that. A head equal
  to the gold wins; a head that is a letter is compared through its choice string; a head equal to a
  full choice string is compared with the gold letter's choice; anything else (an empty or letterless
  response too) picks the choice string (with its "A. " prefix) most similar to the WHOLE parsed
  response by difflib ratio, ties and all-zero to the first.
- yes/no (`judge_judgement`): `parse_response`, "\\n" and "." dropped; right iff exactly one of the
  substrings "yes"/"no" occurs and the gold is a substring ("not", "normal", "node" all say "no").
- open: `parse_response(response) == gold.lower()`: no stripping, no punctuation or article rules.

Flows (which span is taken before those rules; each benchmark follows one, see FLOWS):
- `mcq`: the joined `<answer>` spans (the whole text when none), then multiple choice.
- `mcq_raw`: multiple choice on the raw response.
- `vqa`: the last `\\boxed{}` if any, else the joined `<answer>` spans; lower-cased and stripped; a gold
  of yes/no (after lower-casing) is judged by `judge_judgement`, anything else is open exact match.
- `slake`: the same span; OPEN questions open exact match; CLOSED questions `judge_judgement` only
  when the gold is literally "yes"/"no" (case-sensitive), else exact match after dropping "." and "\\n".
- `mmmu`: MMMU's own parser (the joined `<answer>` spans, then the last `\\boxed{}`; "(A)" letters,
  then " A " letters, then option texts in responses of more than 5 words, the last-placed of
  several; no candidate -> a random letter), gold compared exactly; open questions go through
  MMMU's `eval_open` with the response string itself as the prediction list, so they count only when
  a normalised gold fits inside one character (MedEvalKit's MMMU-val flow does that).

MedEvalKit picks the MMMU random letter from the process-wide RNG; here it comes from an RNG seeded
by the item's benchmark and id, so reruns agree and the expected accuracy is the same.
"""
from __future__ import annotations

import difflib
import random
from dataclasses import dataclass
from typing import Optional, Sequence

FLOWS = ("mcq", "mcq_raw", "vqa", "slake", "mmmu")
_BOXED = "\\boxed{"
_NOT_FOUND = "None"  # mathruler's answer when there is no (closed) \boxed{...}: a string, not None
# MedEvalKit's answer phrases, in its order: each cut applies to what the previous one left.
ANSWER_PHRASES = ("**answer**:", "**answer**", "*answer*:", "**answer:**", "answer is", "answer:",
                  "答案:", "final answer", "final answer is")
_MMMU_STRIP = (",", ".", "!", "?", ";", ":", "'")


@dataclass(frozen=True)
class Verdict:
    correct: bool
    extracted: Optional[str]          # what the rule compared (letter, head or parsed text)
    judge_response: Optional[str] = None  # open questions: the text MedEvalKit's LLM judge is shown


def last_boxed(text: str) -> str:
    """mathruler's extract_boxed_content: the content of the last "\\boxed{" up to its matching
    brace, stripped; the string "None" when there is none or it never closes."""
    start = text.rfind(_BOXED)
    if start < 0:
        return _NOT_FOUND
    depth = 0
    body = start + len(_BOXED)
    for i in range(body, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return text[body:i].strip()
            depth -= 1
    return _NOT_FOUND


def joined_spans(text: Optional[str], tag: str = "answer") -> str:
    """MedEvalKit's extract(text, tag): every closed <tag>…</tag> span (scanning left to right,
    each search resuming after the last close) joined by single spaces and stripped; the text
    itself when that is empty; "" for an empty text."""
    if not text:
        return ""
    opening, closing = f"<{tag}>", f"</{tag}>"
    parts = []
    start = text.find(opening)
    while start >= 0:
        end = text.find(closing, start + len(opening))
        if end < 0:
            break
        parts.append(text[start + len(opening):end] + " ")
        start = text.find(opening, end + len(closing))
    joined = "".join(parts).strip()
    return joined if joined else text


def parse_response(response: str) -> str:
    text = response.lower()
    if "boxed" in text:
        text = last_boxed(text)
    elif "<answer>" in text:
        text = joined_spans(text)
    for phrase in ANSWER_PHRASES:
        cut = text.rfind(phrase)
        if cut >= 0:
            text = text[cut + len(phrase):]
    return text


def _most_similar(candidates: Sequence[str], target: str) -> int:
    best, best_ratio = 0, 0.0
    for i, candidate in enumerate(candidates):
        ratio = difflib.SequenceMatcher(None, candidate, target).ratio()
        if ratio > best_ratio:
            best, best_ratio = i, ratio
    return best


def judge_multi_choice(choices: Sequence[str], answer: str, response: str) -> tuple[bool, str]:
    """(correct, what decided it: the head, or the most similar choice's letter)."""
    letters = [chr(ord("a") + i) for i in range(len(choices))]
    text = response.lower()
    paragraphs = text.split("\n\n")
    if paragraphs[0] in letters:
        text = paragraphs[0]
    elif paragraphs[-1].split(".")[0] in letters:
        text = paragraphs[-1].split(".")[0]
    text = parse_response(text).strip().lower().replace("\n", "")
    lowered = [c.lower() for c in choices]
    head = text.split(".")[0].split(":")[-1]
    gold = answer.strip().lower()
    if head == gold:
        return True, head
    if head in letters:
        return lowered[letters.index(head)] == gold, head
    if head in lowered:
        return gold in letters and head == lowered[letters.index(gold)], head
    pick = _most_similar(lowered, text)
    return letters[pick] == gold or lowered[pick] == gold, letters[pick].upper()


def _flat(response: str) -> str:
    return parse_response(response).replace("\n", "").replace(".", "")


def judge_judgement(answer: str, response: str) -> bool:
    said = _flat(response)
    return (("yes" in said) != ("no" in said)) and answer.lower() in said


def judge_close_end(answer: str, response: str) -> bool:
    return _flat(response) == answer.lower()


def open_exact(answer: str, response: str) -> bool:
    return parse_response(response) == answer.lower()


def _boxed_else_answer(response: str) -> str:
    boxed = last_boxed(response)
    if boxed != _NOT_FOUND:
        return boxed
    return joined_spans(response) if "<answer>" in response else response


# --------------------------------------------------------------------------- MMMU


def mmmu_parse_choice(response: str, all_choices: Sequence[str], index2ans: dict,
                      rng: random.Random) -> str:
    """MMMU's parse_multi_choice_response (as MedEvalKit carries it)."""
    if "<answer>" in response:
        response = joined_spans(response)
    elif "\\boxed" in response:
        response = last_boxed(response)
    response = response.strip()
    for ch in _MMMU_STRIP:
        response = response.strip(ch)
    response = f" {response} "
    found = [c for c in all_choices if f"({c})" in response]
    bracketed = bool(found)
    if not found:
        found = [c for c in all_choices if f" {c} " in response]
    by_text = False
    if not found and len(response.split()) > 5:
        found = [k for k, v in index2ans.items() if v.lower() in response.lower()]
        by_text = bool(found)
    if not found:
        return rng.choice(list(all_choices))
    if len(found) == 1:
        return found[0]
    if by_text:
        where = [response.lower().rfind(index2ans[c].lower()) for c in found]
    else:
        where = [response.rfind(f"({c})" if bracketed else f" {c} ") for c in found]
    return found[where.index(max(where))]


def mmmu_normalize(value: str) -> list:
    """MMMU's normalize_str: a number -> [float rounded to 2 places]; a one-character string ->
    [" x", "x "]; else [lower-cased string]."""
    value = value.strip()
    try:
        return [round(float(value.replace(",", "")), 2)]
    except ValueError:
        pass
    value = value.lower()
    return [" " + value, value + " "] if len(value) == 1 else [value]


def mmmu_eval_open(gold, predictions) -> bool:
    """MMMU's eval_open: a string prediction is right when a normalised string gold occurs in it,
    a number prediction when it equals a normalised gold. `predictions` is iterated as given."""
    golds = [n for g in (gold if isinstance(gold, list) else [gold]) for n in mmmu_normalize(g)]
    for pred in predictions:
        if isinstance(pred, str):
            if any(isinstance(g, str) and g in pred for g in golds):
                return True
        elif pred in golds:
            return True
    return False


def _mmmu(response: str, mek: dict, seed: str) -> Verdict:
    if "<answer>" in response:
        response = joined_spans(response)
    boxed = last_boxed(response)
    if boxed != _NOT_FOUND:
        response = boxed
    gold = mek["answer"]
    if mek.get("question_type") == "multiple-choice":
        pred = mmmu_parse_choice(response, mek["all_choices"], mek["index2ans"], random.Random(seed))
        correct = pred in gold if isinstance(gold, list) else pred == gold
        return Verdict(correct, pred)
    # MedEvalKit's MMMU-val keeps the raw string as parsed_pred: eval_open then walks its characters.
    return Verdict(mmmu_eval_open(gold, response), response)


# --------------------------------------------------------------------------- flows


def score(flow: str, response: Optional[str], mek: dict, *, seed: str = "") -> Verdict:
    """The verdict of MedEvalKit's `flow` on one response. `mek` holds what the flow reads:
    mcq/mcq_raw: `choices` (the strings the prompt listed) and `answer` (letter or text);
    vqa: `answer`; slake: `answer` and `answer_type` (OPEN | CLOSED); mmmu: `answer`,
    `question_type`, `all_choices`, `index2ans`. A missing response is scored as ""."""
    response = response or ""
    if flow in ("mcq", "mcq_raw"):
        text = joined_spans(response) if flow == "mcq" else response
        correct, picked = judge_multi_choice(mek["choices"], str(mek["answer"]), text)
        return Verdict(correct, picked)
    if flow == "vqa":
        text = _boxed_else_answer(response).lower().strip()
        gold = str(mek["answer"]).lower().strip()
        if gold in ("yes", "no"):
            return Verdict(judge_judgement(gold, text), _flat(text))
        return Verdict(open_exact(gold, text), parse_response(text), judge_response=text)
    if flow == "slake":
        text = _boxed_else_answer(response)
        gold = str(mek["answer"])
        if mek.get("answer_type") == "OPEN":
            return Verdict(open_exact(gold, text), parse_response(text), judge_response=text)
        if gold in ("yes", "no"):
            return Verdict(judge_judgement(gold, text), _flat(text))
        return Verdict(judge_close_end(gold, text), _flat(text))
    if flow == "mmmu":
        return _mmmu(response, mek, seed)
    raise ValueError(f"unknown MedEvalKit flow {flow!r}; choose one of {', '.join(FLOWS)}")
