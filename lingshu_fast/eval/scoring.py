"""Scoring eval predictions: `eval.scoring: medevalkit` (default) or `lenient`.

- medevalkit: MedEvalKit's own rules, benchmark by benchmark (`eval.medevalkit`): each item names its
  flow (mcq, mcq_raw, vqa, slake, mmmu) and carries what that flow reads (`mek`). These are the
  numbers Lingshu's table was made with. With a judge (`eval.judge_url`), open questions take the
  judge's verdict instead of exact match, as MedEvalKit's `use_llm_judge` does.
- lenient: our extractor (`lingshu_fast.answers`, the one the RL rewards use): mcq reads the letter or
  an option's text from the `<answer>`/`\\boxed{}` span or the text, falling back to the most similar
  option; yes/no by whole words; open by normalised exact match (case, punctuation and articles
  ignored), the judge asked only when that fails.
A judge that fails (network, HTTP, deadline, bad reply) keeps the rule's verdict and is logged, so a
flaky judge never stops an eval.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

from lingshu_fast.answers import extract_choice, extract_yes_no, final_answer, normalize_text
from lingshu_fast.eval import medevalkit
from lingshu_fast.eval.benchmark_files import TASKS, validate_item
from lingshu_fast.eval.judge import Judge

logger = logging.getLogger(__name__)

SCORING_MODES = ("medevalkit", "lenient")
_JUDGE_ERRORS = (OSError, ValueError, KeyError, TimeoutError)


def prepared(item: dict) -> dict:
    """An item from a loader as is; a bare dict ({question, answer, options?, task?}) validated
    into one (task, gold, flow, mek) without checking images."""
    if "flow" in item and "mek" in item and item.get("task") in TASKS:
        return item
    return validate_item(item, f"item {item.get('id', '?')}", image_root=Path("."), check_images=False)


def score_item(prediction: Optional[str], item: dict, *, scoring: str = "medevalkit",
               judge: Optional[Judge] = None) -> tuple[bool, Optional[str]]:
    """(correct, what the rule extracted) for one prediction."""
    item = prepared(item)
    if scoring == "medevalkit":
        return _medevalkit(prediction, item, judge)
    if scoring == "lenient":
        return _lenient(prediction, item, judge)
    raise ValueError(f"eval.scoring {scoring!r}: choose one of {', '.join(SCORING_MODES)}")


def _medevalkit(prediction: Optional[str], item: dict, judge: Optional[Judge]) -> tuple[bool, Optional[str]]:
    mek = item["mek"]
    golds = mek["answer"] if isinstance(mek["answer"], list) else [mek["answer"]]
    seed = f"{item.get('benchmark', '')}:{item.get('id', '')}"
    verdicts = [medevalkit.score(item["flow"], prediction, {**mek, "answer": g}, seed=seed) for g in golds]
    verdict = next((v for v in verdicts if v.correct), verdicts[0])
    if judge is not None and verdict.judge_response is not None:
        try:
            return judge.medevalkit_verdict(item["question"], verdict.judge_response, " | ".join(map(str, golds))), \
                verdict.extracted
        except _JUDGE_ERRORS as err:
            logger.warning("LLM judge failed for item %s (%s); using the exact-match verdict", item.get("id"), err)
    return verdict.correct, verdict.extracted


def _lenient(prediction: Optional[str], item: dict, judge: Optional[Judge]) -> tuple[bool, Optional[str]]:
    task, gold = item["task"], item.get("gold")
    if task == "mcq":
        choice = extract_choice(prediction, item.get("options"), similar_fallback=True)
        return choice is not None and choice == gold, choice
    if task == "yesno":
        said = extract_yes_no(prediction)
        return said is not None and said == gold, said
    answer = final_answer(prediction)
    if not answer:
        return False, None
    golds = gold if isinstance(gold, list) else [str(gold)]
    predicted = normalize_text(answer)
    if any(predicted == normalize_text(g) for g in golds):
        return True, answer
    if judge is not None:
        try:
            return judge.lenient_verdict(item["question"], answer, " | ".join(golds)), answer
        except _JUDGE_ERRORS as err:
            logger.warning("LLM judge failed for item %s (%s); using exact match", item.get("id"), err)
    return False, answer


def score_predictions(items: Sequence[dict], predictions: Sequence[Optional[str]], *,
                      scoring: str = "medevalkit", judge: Optional[Judge] = None) -> list[dict]:
    """Score aligned items and predictions -> result rows for `report.report`:
    {benchmark, id, task, category, flow, scoring, question, options, answer, images, prediction,
    extracted, correct}."""
    if len(items) != len(predictions):
        raise ValueError(f"{len(items)} items but {len(predictions)} predictions")
    rows = []
    for raw, prediction in zip(items, predictions):
        item = prepared(raw)
        correct, extracted = score_item(prediction, item, scoring=scoring, judge=judge)
        rows.append({"benchmark": item.get("benchmark", "benchmark"), "id": item.get("id"),
                     "task": item["task"], "category": item.get("category"), "flow": item["flow"],
                     "scoring": scoring, "question": item.get("question"), "options": item.get("options"),
                     "answer": item.get("answer"), "images": item.get("images", []),
                     "prediction": prediction, "extracted": extracted, "correct": bool(correct)})
    return rows
