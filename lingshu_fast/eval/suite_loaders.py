"""One loader per benchmark of the Lingshu suite: release rows -> items with MedEvalKit's prompt,
choices, gold and flow (see `eval.suite` for the table). Every loader takes the release folder,
`cache` (where Parquet-embedded images are written) and `reasoning` (MedEvalKit's REASONING=True
prompts), and returns items in the release's order.

An item: benchmark, id, question, prompt, images, image_layout, task (mcq | yesno | open), category,
flow, mek (what the MedEvalKit flow reads), and for lenient scoring options / gold.
"""
from __future__ import annotations

import ast
import csv
import json
import re
from pathlib import Path
from typing import Optional

from lingshu_fast.answers import gold_choice, normalize_yes_no
from lingshu_fast.eval import prompts
from lingshu_fast.eval.benchmark_files import BenchmarkError
from lingshu_fast.eval.tables import image_path, read_rows, read_split, split_files

LETTERS = "ABCDEFGHIJ"
MMMU_MED_SUBJECTS = ("Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine",
                     "Pharmacy", "Public_Health")


def _item(benchmark: str, index: int, *, question: str, prompt: str, images=(), task: str, flow: str,
          mek: dict, category=None, options: Optional[dict] = None, row_id=None, layout: str = "single") -> dict:
    answer = mek["answer"]
    if task == "mcq":
        gold = gold_choice(str(answer), options) if options else None
    elif task == "yesno":
        gold = normalize_yes_no(str(answer))
    else:
        gold = [str(answer)]
    return {"benchmark": benchmark, "id": row_id if row_id is not None else f"{benchmark}:{index}",
            "question": question, "prompt": prompt, "images": list(images), "image_layout": layout,
            "task": task, "category": category, "flow": flow, "mek": mek, "options": options,
            "answer": answer, "gold": gold}


def _need(row: dict, keys, where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise BenchmarkError(f"{where}: missing field(s) {missing}; is this the benchmark's release file?")


def _lettered(texts) -> dict:
    return {LETTERS[i]: str(t) for i, t in enumerate(texts)}


# --------------------------------------------------------------------------- VQA


def _vqa(folder: Path, name: str, cache, reasoning: bool, *, lower_for_prompt: bool) -> list[dict]:
    rows, files = read_split(folder, "test", name)
    items = []
    for i, row in enumerate(rows):
        where = f"{files[0].parent}: {name} row {i}"
        _need(row, ("question", "answer", "image"), where)
        answer = str(row["answer"])
        # VQA-RAD picks the prompt by the lower-cased answer, PathVQA by the answer as written
        closed = (answer.lower() if lower_for_prompt else answer) in ("yes", "no")
        build = prompts.judgement if closed else prompts.open_ended
        yes_no = answer.lower().strip() in ("yes", "no")
        items.append(_item(name, i, question=row["question"], prompt=build(row["question"], reasoning=reasoning),
                           images=[image_path(row["image"], folder, cache, where)],
                           task="yesno" if yes_no else "open", flow="vqa", mek={"answer": answer},
                           category="close" if yes_no else "open"))
    return items


def load_vqa_rad(folder: Path, *, cache=None, reasoning=False) -> list[dict]:
    return _vqa(folder, "VQA-RAD", cache, reasoning, lower_for_prompt=True)


def load_path_vqa(folder: Path, *, cache=None, reasoning=False) -> list[dict]:
    return _vqa(folder, "PathVQA", cache, reasoning, lower_for_prompt=False)


def load_slake(folder: Path, *, cache=None, reasoning=False) -> list[dict]:
    path = folder / "test.json"
    if not path.is_file():
        raise BenchmarkError(f"{folder}: SLAKE needs test.json (and imgs/) from its release")
    items = []
    for i, row in enumerate(read_rows(path)):
        where = f"{path}: record {i}"
        _need(row, ("img_name", "question", "answer", "answer_type", "q_lang"), where)
        answer, kind, lang = str(row["answer"]), row["answer_type"], row["q_lang"]
        build = prompts.open_ended if kind == "OPEN" else prompts.close_ended
        task = "open" if kind == "OPEN" or answer not in ("yes", "no") else "yesno"
        items.append(_item("SLAKE", i, question=row["question"],
                           prompt=build(row["question"], reasoning=reasoning, lang=lang),
                           images=[image_path(row["img_name"], folder / "imgs", cache, where)], task=task,
                           flow="slake", mek={"answer": answer, "answer_type": kind},
                           category=f"{lang} {str(kind).lower()}", row_id=row.get("qid")))
    return items


def load_pmc_vqa(folder: Path, *, cache=None, reasoning=False) -> list[dict]:
    path = folder / "test_2.csv"
    if not path.is_file():
        raise BenchmarkError(f"{folder}: PMC-VQA needs test_2.csv (and figures/ or images/) from its release")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))[1:]  # positional, header skipped, as MedEvalKit reads it
    items = []
    for i, row in enumerate(rows):
        where = f"{path}: row {i + 2}"
        if len(row) != 10:
            raise BenchmarkError(f"{where}: expected 10 columns (index, Figure_path, Caption, Question, "
                                 f"Choice A-D, Answer, split), got {len(row)}")
        _, figure, _, question, *choices, answer, _ = row
        root = folder / "figures" if (folder / "figures" / figure).is_file() else folder / "images"
        options = {LETTERS[j]: re.sub(rf"^\s*{LETTERS[j]}\s*:\s*", "", c).strip() for j, c in enumerate(choices)}
        items.append(_item("PMC-VQA", i, question=question,
                           prompt=prompts.multiple_choice(question, choices, reasoning=reasoning),
                           images=[image_path(figure, root, cache, where)], task="mcq", flow="mcq_raw",
                           mek={"choices": choices, "answer": answer}, options=options))
    return items


def load_omnimedvqa(folder: Path, *, cache=None, reasoning=False) -> list[dict]:
    qa = folder / "QA_information" / "Open-access"
    files = sorted(qa.glob("*.json")) if qa.is_dir() else []
    if not files:
        raise BenchmarkError(f"{folder}: OmniMedVQA needs QA_information/Open-access/*.json from its release")
    items = []
    for path in files:
        for row in read_rows(path):
            where = f"{path}: {row.get('question_id', len(items))}"
            _need(row, ("question", "gt_answer", "image_path"), where)
            answer, options, choices = row["gt_answer"], {}, []
            for letter in "ABCD":
                if f"option_{letter}" in row:
                    text = row[f"option_{letter}"]
                    if answer == text:
                        answer = letter  # MedEvalKit maps the gold text to its letter (the last match)
                    options[letter] = str(text)
                    choices.append(f"{letter}. {text}")
            items.append(_item("OmniMedVQA", len(items), question=row["question"],
                               prompt=prompts.multiple_choice(row["question"], choices, reasoning=reasoning),
                               images=[image_path(row["image_path"], folder, cache, where)], task="mcq",
                               flow="mcq", mek={"choices": choices, "answer": answer}, options=options,
                               category=row.get("modality_type"), row_id=row.get("question_id")))
    return items


def load_mmmu_med(folder: Path, *, cache=None, reasoning=False) -> list[dict]:
    items = []
    for subject in MMMU_MED_SUBJECTS:
        sub = folder / subject
        if not sub.is_dir():
            raise BenchmarkError(f"{folder}: MMMU needs the {subject}/ folder (validation-*.parquet) of its release")
        rows, _ = read_split(sub, "validation", f"MMMU {subject}")
        for row in rows:
            items.append(_mmmu_item(row, folder, subject, cache, reasoning, len(items)))
    return items


def _mmmu_item(row: dict, folder: Path, subject: str, cache, reasoning: bool, index: int) -> dict:
    where = f"{folder / subject}: {row.get('id', index)}"
    _need(row, ("id", "question", "options", "answer", "question_type", "image_1"), where)
    options = ast.literal_eval(row["options"]) if isinstance(row["options"], str) else list(row["options"])
    option_images = sum(len(re.findall(r"<img='(.*?)'>", str(o))) for o in options)
    # MedEvalKit sends only image_1, and no image at all when several options are images
    images = [] if option_images > 1 or not row.get("image_1") else [image_path(row["image_1"], folder, cache, where)]
    kind = row["question_type"]
    mek = {"answer": row["answer"], "question_type": kind}
    if kind == "multiple-choice":
        mek["all_choices"] = list(LETTERS[:len(options)])
        mek["index2ans"] = _lettered(options)
    return _item("MMMU-Med", index, question=row["question"],
                 prompt=prompts.mmmu(row["question"], options, kind, reasoning=reasoning), images=images,
                 task="mcq" if kind == "multiple-choice" else "open", flow="mmmu", mek=mek, category=subject,
                 options=_lettered(options) if kind == "multiple-choice" else None, row_id=row["id"])


# --------------------------------------------------------------------------- multiple-choice QA


def _mcq_item(name: str, index: int, question: str, options: dict, answer, *, sep: str, reasoning: bool,
              context: Optional[str] = None, **extra) -> dict:
    choices = [f"{k}{sep}{v}" for k, v in options.items()]
    prompt = prompts.multiple_choice(question, choices, reasoning=reasoning)
    if context is not None:
        prompt = f"Context: {context}\n" + prompt
    return _item(name, index, question=question, prompt=prompt, task="mcq", flow="mcq",
                 mek={"choices": choices, "answer": answer}, options={k: str(v) for k, v in options.items()},
                 **extra)


def _medxpertqa(folder: Path, subset: str, cache, reasoning: bool) -> list[dict]:
    sub = folder / subset if (folder / subset).is_dir() else folder
    rows, _ = read_split(sub, "test", f"MedXpertQA-{subset}")
    image_root = folder / "images" if (folder / "images").is_dir() else sub.parent / "images"
    items = []
    for i, row in enumerate(rows):
        where = f"{sub}: {row.get('id', i)}"
        _need(row, ("question", "options", "label"), where)
        images = [image_path(name, image_root, cache, where) for name in row.get("images") or []]
        item = _mcq_item(f"MedXpertQA-{subset}", i, row["question"], dict(row["options"]), row["label"], sep=". ",
                         reasoning=reasoning, category=row.get("question_type"), row_id=row.get("id"))
        item.update(images=images, image_layout="numbered")
        items.append(item)
    return items


def load_medxpertqa_mm(folder: Path, *, cache=None, reasoning=False) -> list[dict]:
    return _medxpertqa(folder, "MM", cache, reasoning)


def load_medxpertqa_text(folder: Path, *, cache=None, reasoning=False) -> list[dict]:
    return _medxpertqa(folder, "Text", cache, reasoning)


def load_medxpertqa(folder: Path, *, cache=None, reasoning=False) -> list[dict]:
    subsets = [s for s in ("MM", "Text") if (folder / s).is_dir()]
    if not subsets:
        raise BenchmarkError(f"{folder}: MedXpertQA needs its MM/ and/or Text/ folders (test.jsonl)")
    return [item for s in subsets for item in _medxpertqa(folder, s, cache, reasoning)]


def load_medqa(folder: Path, *, cache=None, reasoning=False) -> list[dict]:
    rows, files = read_split(folder, "test", "MedQA-USMLE")
    items = []
    for i, row in enumerate(rows):
        _need(row, ("question", "options", "answer_idx"), f"{files[0]}: row {i}")
        options = {k: row["options"][k] for k in "ABCD"}  # MedEvalKit lists A-D only
        items.append(_mcq_item("MedQA-USMLE", i, row["question"], options, row["answer_idx"], sep=". ",
                               reasoning=reasoning))
    return items


def load_medmcqa(folder: Path, *, cache=None, reasoning=False) -> list[dict]:
    files = split_files(folder, "validation") or split_files(folder, "dev")
    if not files:
        raise BenchmarkError(f"{folder}: MedMCQA needs its validation split (validation-*.parquet, or dev.json)")
    rows = [row for f in files for row in read_rows(f)]
    cops = {int(row["cop"]) for row in rows if "cop" in row}
    # The Hub release numbers the answer 0-3 (MedEvalKit reads that); the original dev.json 1-4.
    one_based = 4 in cops or (0 not in cops and all(f.stem.startswith("dev") for f in files))
    items = []
    for i, row in enumerate(rows):
        _need(row, ("question", "opa", "opb", "opc", "opd", "cop"), f"{files[0]}: row {i}")
        options = {"A": row["opa"], "B": row["opb"], "C": row["opc"], "D": row["opd"]}
        answer = "ABCD"[int(row["cop"]) - (1 if one_based else 0)]
        items.append(_mcq_item("MedMCQA", i, row["question"], options, answer, sep=". ", reasoning=reasoning,
                               category=row.get("subject_name"), row_id=row.get("id")))
    return items


def load_pubmedqa(folder: Path, *, cache=None, reasoning=False) -> list[dict]:
    rows, files = read_split(folder, "test", "PubMedQA")
    items = []
    for i, row in enumerate(rows):
        data = row.get("data", row)
        if isinstance(data, str):
            data = json.loads(data)
        _need(data, ("Question", "Options", "Context", "Correct Option"), f"{files[0]}: row {i}")
        context = data["Context"]
        context = "\n".join(context) if isinstance(context, list) else str(context)
        options = {k: data["Options"][k] for k in "ABC"}
        items.append(_mcq_item("PubMedQA", i, data["Question"], options, data["Correct Option"], sep=".",
                               reasoning=reasoning, context=context, row_id=row.get("id")))
    return items


def load_medbullets(folder: Path, *, cache=None, reasoning=False) -> list[dict]:
    files = split_files(folder, "train") or sorted(folder.glob("*.csv"))
    if not files:
        raise BenchmarkError(f"{folder}: Medbullets needs its train split (train-*.parquet) or medbullets_op*.csv")
    rows = [row for f in files for row in read_rows(f)]
    items = []
    for i, row in enumerate(rows):
        where = f"{files[0]}: row {i}"
        if isinstance(row.get("options"), dict):
            options = dict(row["options"])
        else:
            _need(row, ("opa", "opb", "opc", "opd"), where)
            options = {k: row[f"op{k.lower()}"] for k in "ABCDE" if row.get(f"op{k.lower()}") not in (None, "")}
        _need(row, ("question", "answer_idx"), where)
        items.append(_mcq_item(f"Medbullets-op{len(options)}", i, row["question"], options, row["answer_idx"],
                               sep=".", reasoning=reasoning))
    return items
