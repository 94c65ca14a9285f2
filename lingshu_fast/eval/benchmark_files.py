"""Benchmark files in our JSONL format, and the eval prompt of every item.

A benchmark is a JSONL file, one question per line:
  {"question": str, "options": {"A": str, ...} | [str, ...] (optional), "answer": str | [str, ...],
   "images": [path, ...] | path (optional; PNG/JPEG/DICOM, relative to `image_root` or the file's
   folder), "task": "mcq" | "yesno" | "open" (optional), "flow": a MedEvalKit flow (optional),
   "id": any (optional)}
An mcq answer is a letter ("C") or an option's text; a yesno answer is yes/no; an open answer is a
string or a list of accepted strings. When `task` is absent it is inferred (options -> mcq, yes/no ->
yesno, else open); any other `task` value is kept as the item's `category` (a breakdown in the
report) and the scoring task is inferred. The benchmark's name is the file's stem unless given.

`flow` says which MedEvalKit scoring flow the item follows under `eval.scoring: medevalkit`
(`lingshu_fast.eval.medevalkit`): declared per item, else inferred from the file's name (a file named
like PMC-VQA or MedFrameQA -> mcq_raw, SLAKE -> slake) or else from the task (mcq -> mcq, yes/no and
open -> vqa, the VQA-RAD flow). Only the flows a plain question file can feed are allowed here:
mcq, mcq_raw, vqa, slake. The release formats of the Lingshu suite are read by `eval.suite`.

Every item carries `prompt`, the user text MedEvalKit would send (`eval.prompts`), and `mek`, what
its flow reads; `build_eval_messages` adds the image markers.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

from lingshu_fast.answers import gold_choice, normalize_text, normalize_yes_no, options_as_dict
from lingshu_fast.data.formats import iter_jsonl
from lingshu_fast.eval import prompts

TASKS = ("mcq", "yesno", "open")
IMAGE_MARKER = "<image>"  # the marker the data formats and chat template place images by

PLAIN_FLOWS = ("mcq", "mcq_raw", "vqa", "slake")
_FLOW_BY_NAME = {"pmcvqa": "mcq_raw", "medframeqa": "mcq_raw", "slake": "slake"}


def name_key(name: str) -> str:
    """'VQA-RAD', 'vqa_rad', 'VQA_RAD' -> 'vqarad': how benchmark names are matched."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


class BenchmarkError(ValueError):
    """A benchmark file is unusable; the message names file:line, the field and what to do."""


def _fail(where: str, message: str):
    raise BenchmarkError(f"{where}: {message}")


def infer_bench_task(item: dict) -> str:
    """options -> mcq; a yes/no answer -> yesno; else open."""
    if item.get("options"):
        return "mcq"
    if isinstance(item.get("answer"), str) and normalize_yes_no(item["answer"]) is not None:
        return "yesno"
    return "open"


def validate_item(raw: Any, where: str, *, image_root: Path, check_images: bool = True,
                  default_flow: Optional[str] = None, reasoning: bool = False) -> dict:
    """One JSONL record -> a checked item with `task`, `category`, resolved `images`, `gold`,
    `flow`, `mek` and `prompt`."""
    if not isinstance(raw, dict):
        _fail(where, f"expected a JSON object, got {type(raw).__name__}")
    item = dict(raw)
    question = item.get("question")
    if not isinstance(question, str) or not question.strip():
        _fail(where, "'question' must be a non-empty string")
    answer = item.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = item["answer"] = str(answer)
    if isinstance(answer, list):
        if not answer or not all(isinstance(a, str) and a.strip() for a in answer):
            _fail(where, "'answer' as a list must hold non-empty strings")
    elif not isinstance(answer, str) or not answer.strip():
        _fail(where, "'answer' is missing or empty")
    options = item.get("options")
    if options is not None:
        if not isinstance(options, (dict, list)) or isinstance(options, str):
            _fail(where, "'options' must be a dict {'A': text} or a list of texts")
        try:
            opts = options_as_dict(options)
        except (TypeError, ValueError) as err:
            _fail(where, f"'options': {err}")
        if len(opts) < 2 or not all(isinstance(v, str) and v.strip() for v in options_as_dict(options).values()):
            _fail(where, "'options' needs at least two non-empty texts")
        bad_keys = [k for k in opts if len(k) != 1 or not k.isalpha()]
        if bad_keys:
            _fail(where, f"option keys must be single letters, got {bad_keys}")
    label = str(item.get("task") or "").strip().lower()
    task = label if label in TASKS else infer_bench_task(item)
    item["category"] = label if label and label not in TASKS else item.get("category")
    item["task"] = task
    if task == "mcq":
        if not options:
            _fail(where, "task 'mcq' needs 'options'")
        if not isinstance(answer, str) or gold_choice(answer, options) is None:
            _fail(where, f"mcq answer {answer!r} is neither an option letter ({''.join(options_as_dict(options))}) "
                         "nor one option's text")
        item["gold"] = gold_choice(answer, options)
    elif task == "yesno":
        gold = normalize_yes_no(answer) if isinstance(answer, str) else None
        if gold is None:
            _fail(where, f"task 'yesno' needs answer yes or no, got {answer!r}")
        item["gold"] = gold
    else:
        golds = answer if isinstance(answer, list) else [answer]
        if not any(normalize_text(g) for g in golds):
            _fail(where, f"open answer {answer!r} is empty after normalisation (only punctuation/articles)")
        item["gold"] = golds
    item["images"] = _resolve_images(item.get("images"), where, image_root, check_images)
    markers = question.count(IMAGE_MARKER)
    if markers and markers != len(item["images"]):
        _fail(where, f"question has {markers} {IMAGE_MARKER} markers but {len(item['images'])} images")
    _attach_medevalkit(item, where, default_flow, reasoning)
    return item


def _attach_medevalkit(item: dict, where: str, default_flow: Optional[str], reasoning: bool) -> None:
    """`flow`, `mek` (what the flow reads) and `prompt` (MedEvalKit's wording) of a plain item."""
    task = item["task"]
    flow = item.get("flow") or default_flow or ("mcq" if task == "mcq" else "vqa")
    if flow not in PLAIN_FLOWS:
        _fail(where, f"'flow' {flow!r} is not one a question file can follow; choose one of {', '.join(PLAIN_FLOWS)}")
    if (task == "mcq") != (flow in ("mcq", "mcq_raw")):
        _fail(where, f"flow {flow!r} does not fit task {task!r} (mcq and mcq_raw are for multiple choice)")
    item["flow"] = flow
    question = item["question"].strip()
    if task == "mcq":
        choices = [f"{k}. {v}" for k, v in options_as_dict(item["options"]).items()]
        item["mek"] = {"choices": choices, "answer": item["gold"]}
        item["prompt"] = prompts.multiple_choice(question, choices, reasoning=reasoning)
        return
    answer = item["gold"]
    if flow == "slake":
        kind = str(item.get("category") or "").lower()
        open_question = kind == "open" if kind in ("open", "closed") else task == "open"
        item["mek"] = {"answer": answer, "answer_type": "OPEN" if open_question else "CLOSED"}
        build = prompts.open_ended if open_question else prompts.close_ended
    else:
        item["mek"] = {"answer": answer}
        build = prompts.judgement if task == "yesno" else prompts.open_ended
    item["prompt"] = build(question, reasoning=reasoning)


def _resolve_images(images: Any, where: str, image_root: Path, check: bool) -> list[str]:
    if images is None:
        return []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        _fail(where, "'images' must be a path or a list of paths")
    resolved = []
    for path in images:
        full = Path(path) if os.path.isabs(path) else image_root / path
        if check and not full.is_file():
            _fail(where, f"image not found: {path!r} (looked at {full}); fix the path or pass image_root")
        resolved.append(str(full))
    return resolved


def load_benchmark(path: Union[str, Path], *, name: Optional[str] = None,
                   image_root: Union[str, Path, None] = None, check_images: bool = True,
                   reasoning: bool = False) -> list[dict]:
    """Read and validate a benchmark JSONL; every item gains `benchmark`, `id`, `line`, `task`,
    `category`, `gold` (letter | 'yes'/'no' | accepted strings), absolute `images`, `flow`, `mek`
    and `prompt` (`reasoning`: MedEvalKit's REASONING=True wording)."""
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"benchmark file not found: {path}")
    name = name or path.stem
    root = Path(image_root) if image_root is not None else path.parent
    items = []
    with open(path, encoding="utf-8") as f:
        for line_no, raw, bad_json in iter_jsonl(f):
            where = f"{path}:{line_no}"
            if bad_json is not None:
                raise BenchmarkError(f"{where}: invalid JSON ({bad_json})")
            item = validate_item(raw, where, image_root=root, check_images=check_images,
                                 default_flow=_FLOW_BY_NAME.get(name_key(name)), reasoning=reasoning)
            item.update(benchmark=name, line=line_no)
            item.setdefault("id", f"{name}:{line_no}")
            items.append(item)
    if not items:
        raise BenchmarkError(f"{path}: no questions in the file")
    return items


def build_eval_messages(item: dict) -> list[dict]:
    """The user turn for one item: its `prompt` (MedEvalKit's text), the images first as MedEvalKit's
    Qwen2.5-VL wrapper lays them out: one `<image>` marker for an item with one image, or
    "<image_1>: <image><image_2>: <image>…" for items with several or a `numbered` image layout
    (MedXpertQA-MM); nothing added when the prompt places its own `<image>` markers."""
    prompt = item["prompt"]
    images = item.get("images") or []
    if not images or IMAGE_MARKER in prompt:
        prefix = ""
    elif len(images) == 1 and item.get("image_layout") != "numbered":
        prefix = IMAGE_MARKER
    else:
        prefix = "".join(f"<image_{i + 1}>: {IMAGE_MARKER}" for i in range(len(images)))
    return [{"role": "user", "content": prefix + prompt}]
