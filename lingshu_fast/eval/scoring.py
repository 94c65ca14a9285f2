"""Scoring eval predictions the way MedEvalKit scores Lingshu, on the extraction code the RL
verifiers use (`lingshu_fast.rl.extract`, one implementation).

- mcq: the letter, or an option's text, from the `<answer>`/`\\boxed{}` span or the text; when no
  rule matches, the most similar option by difflib ratio (MedEvalKit's fallback; RL rewards do not
  use it). Several different letters count as wrong.
- yesno: whole-word yes/no rules (`extract_yes_no`).
- open: normalised exact match (lower case, no punctuation/articles) against any accepted answer;
  with `judge_url`, an answer that does not match exactly is asked of an LLM judge behind an
  OpenAI-compatible chat-completions endpoint (off by default; a judge error keeps the exact-match
  verdict and is logged, so a flaky judge never stops an eval).
"""
from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from typing import Optional, Sequence

from lingshu_fast.eval.bench_format import TASKS, infer_bench_task
from lingshu_fast.rl.extract import (
    extract_choice, extract_yes_no, final_answer, gold_choice, normalize_text, normalize_yes_no,
)

logger = logging.getLogger(__name__)

_JUDGE_PROMPT = """You grade answers to medical questions. Decide whether the candidate answer means the
same as the reference answer (synonyms, abbreviations and equivalent phrasings count as the same;
a different or less specific finding does not).

Question: {question}
Reference answer: {answer}
Candidate answer: {prediction}

Reply with exactly one word: correct or incorrect."""


def _task(item: dict) -> str:
    task = str(item.get("task") or "").strip().lower()
    return task if task in TASKS else infer_bench_task(item)


def _gold(item: dict):
    """The item's gold label; items from `load_benchmark` carry it as `gold` already."""
    if "gold" in item:
        return item["gold"]
    task = _task(item)
    if task == "mcq":
        return gold_choice(str(item["answer"]), item.get("options"))
    if task == "yesno":
        return normalize_yes_no(str(item["answer"]))
    answer = item["answer"]
    return [str(a) for a in answer] if isinstance(answer, list) else [str(answer)]


def score_item(prediction: Optional[str], item: dict, *, judge_url: Optional[str] = None,
               judge_model: str = "gpt-4o-mini", judge_timeout_s: float = 60.0) -> tuple[bool, Optional[str]]:
    """(correct, extracted answer or None) for one prediction; `item` needs `answer` (and
    `options` for mcq); `task` is inferred when absent or not mcq/yesno/open."""
    task = _task(item)
    gold = _gold(item)
    if task == "mcq":
        choice = extract_choice(prediction, item.get("options"), similar_fallback=True)
        return choice is not None and choice == gold, choice
    if task == "yesno":
        said = extract_yes_no(prediction)
        return said is not None and said == gold, said
    answer = final_answer(prediction)
    if not answer:
        return False, None
    predicted = normalize_text(answer)
    if any(predicted == normalize_text(g) for g in gold):
        return True, answer
    if judge_url:
        try:
            return llm_judge(item["question"], answer, " | ".join(gold), url=judge_url, model=judge_model,
                             timeout_s=judge_timeout_s), answer
        except (OSError, ValueError, KeyError) as err:  # network, HTTP, bad JSON: keep the exact verdict
            logger.warning("LLM judge failed for item %s (%s); using exact match", item.get("id"), err)
    return False, answer


def llm_judge(question: str, prediction: str, answer: str, *, url: str, model: str = "gpt-4o-mini",
              timeout_s: float = 60.0, api_key: Optional[str] = None) -> bool:
    """Ask an OpenAI-compatible endpoint whether `prediction` means `answer`. `url` is the API
    base (".../v1") or the full ".../chat/completions"; the key comes from `api_key` or the
    OPENAI_API_KEY environment variable (none sent when neither is set)."""
    endpoint = url.rstrip("/")
    if not endpoint.endswith("/chat/completions"):
        endpoint += "/chat/completions"
    body = {"model": model, "temperature": 0, "max_tokens": 8, "messages": [
        {"role": "user", "content": _JUDGE_PROMPT.format(question=question, answer=answer, prediction=prediction)}]}
    headers = {"Content-Type": "application/json"}
    key = api_key or os.environ.get("OPENAI_API_KEY")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(endpoint, data=json.dumps(body).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        reply = json.loads(response.read().decode("utf-8"))
    verdict = normalize_text(reply["choices"][0]["message"]["content"])
    if verdict.startswith("incorrect") or verdict.startswith("not correct"):
        return False
    if verdict.startswith("correct"):
        return True
    raise ValueError(f"judge reply is neither 'correct' nor 'incorrect': {verdict[:80]!r}")


def score_predictions(items: Sequence[dict], predictions: Sequence[Optional[str]], *,
                      judge_url: Optional[str] = None, judge_model: str = "gpt-4o-mini") -> list[dict]:
    """Score aligned items and predictions -> result rows for `bench_format.report`:
    {benchmark, id, task, category, question, options, answer, images, prediction, extracted, correct}."""
    if len(items) != len(predictions):
        raise ValueError(f"{len(items)} items but {len(predictions)} predictions")
    rows = []
    for item, prediction in zip(items, predictions):
        correct, extracted = score_item(prediction, item, judge_url=judge_url, judge_model=judge_model)
        rows.append({"benchmark": item.get("benchmark", "benchmark"), "id": item.get("id"),
                     "task": _task(item), "category": item.get("category"),
                     "question": item.get("question"), "options": item.get("options"),
                     "answer": item.get("answer"), "images": item.get("images", []),
                     "prediction": prediction, "extracted": extracted, "correct": bool(correct)})
    return rows
