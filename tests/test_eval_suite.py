"""Loaders of the Lingshu evaluation suite (lingshu_fast/eval/suite.py, suite_loaders.py, tables.py,
prompts.py): each reads a small file written here in the benchmark's public release format
(Hub Parquet with embedded images, JSON, JSONL, CSV + image folders) and must yield MedEvalKit's
prompt (exact text: prompt wording moves accuracy), its choices, gold and flow.

Pins: a wrong column, letter offset (MedMCQA cop) or prompt string silently changes every number
compared with Lingshu's table.
"""
import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from lingshu_fast.eval.benchmark_files import BenchmarkError, build_eval_messages
from lingshu_fast.eval.scoring import score_item
from lingshu_fast.eval.suite import load_benchmarks

MCQ_TAIL = "Answer with the option's letter from the given choices directly."


def _png(color=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def _parquet(path: Path, rows: list[dict]) -> Path:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def _image_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png())
    return path


def test_vqa_rad_parquet_with_embedded_images(tmp_path):
    root = tmp_path / "VQA_RAD"
    png = _png()
    _parquet(root / "data" / "test-00000-of-00001.parquet", [
        {"image": {"bytes": png, "path": "synpic1.jpg"}, "question": "is there a mass?", "answer": "Yes"},
        {"image": {"bytes": png, "path": "synpic1.jpg"}, "question": "which organ?", "answer": "liver"}])
    _parquet(root / "data" / "train-00000-of-00001.parquet", [
        {"image": {"bytes": png, "path": "x.jpg"}, "question": "train only", "answer": "no"}])
    items = load_benchmarks(root, image_cache=tmp_path / "cache")
    assert [i["question"] for i in items] == ["is there a mass?", "which organ?"]   # test split only
    assert items[0]["prompt"] == "is there a mass?\nPlease output 'yes' or 'no'(no extra output)."
    assert items[1]["prompt"] == "which organ?\nPlease answer the question concisely."
    assert [(i["benchmark"], i["flow"], i["task"], i["category"]) for i in items] == [
        ("VQA-RAD", "vqa", "yesno", "close"), ("VQA-RAD", "vqa", "open", "open")]
    assert Path(items[0]["images"][0]).read_bytes() == png and items[0]["images"] == items[1]["images"]
    assert build_eval_messages(items[0])[0]["content"].startswith("<image>is there a mass?")
    assert score_item("yes", items[0]) == (True, "yes") and score_item("Liver.", items[1])[0] is False
    with pytest.raises(BenchmarkError, match="image cache"):
        load_benchmarks(root)


def test_path_vqa_shards_and_raw_answer_prompt(tmp_path):
    """PathVQA reads every test shard; its prompt looks at the answer as written ('Yes' -> open prompt)."""
    root = tmp_path / "PATH_VQA"
    png = _png()
    _parquet(root / "data" / "test-00000-of-00002.parquet",
             [{"image": {"bytes": png, "path": None}, "question": "q1", "answer": "yes"}])
    _parquet(root / "data" / "test-00001-of-00002.parquet",
             [{"image": {"bytes": png, "path": None}, "question": "q2", "answer": "Yes"}])
    items = load_benchmarks(root, image_cache=tmp_path / "cache", reasoning=True)
    assert items[0]["prompt"] == 'q1\nPlease output "yes" or "no" and put the answer in one "\\boxed{}".'
    assert items[1]["prompt"] == 'q2\nPlease answer the question concisely and put the answer in one "\\boxed{}".'
    assert items[1]["task"] == "yesno" and score_item("\\boxed{yes}", items[1])[0] is True


def test_slake_json_and_image_folder(tmp_path):
    root = tmp_path / "SLAKE"
    _image_file(root / "imgs" / "xmlab1" / "source.jpg")
    (root / "test.json").write_text(json.dumps([
        {"img_name": "xmlab1/source.jpg", "question": "Is this a CT?", "answer": "Yes", "answer_type": "CLOSED",
         "q_lang": "en", "qid": 11},
        {"img_name": "xmlab1/source.jpg", "question": "Which organ?", "answer": "Liver", "answer_type": "OPEN",
         "q_lang": "en", "qid": 12},
        {"img_name": "xmlab1/source.jpg", "question": "这是CT吗?", "answer": "是", "answer_type": "CLOSED",
         "q_lang": "zh", "qid": 13}], ensure_ascii=False), encoding="utf-8")
    items = load_benchmarks(root)
    assert [i["prompt"] for i in items] == [
        "Is this a CT?\nAnswer the question using a single word or phrase.",
        "Which organ?\nPlease answer the question concisely.", "这是CT吗?\n请用一个单词或者短语回答该问题。"]
    assert [i["mek"] for i in items] == [{"answer": "Yes", "answer_type": "CLOSED"},
                                         {"answer": "Liver", "answer_type": "OPEN"},
                                         {"answer": "是", "answer_type": "CLOSED"}]
    assert [i["id"] for i in items] == [11, 12, 13] and items[2]["category"] == "zh closed"
    assert score_item("yes", items[0])[0] is True and score_item("是。", items[2])[0] is False


def test_pmc_vqa_csv_positional_and_raw_flow(tmp_path):
    root = tmp_path / "PMC-VQA"
    _image_file(root / "images" / "PMC1_F2.jpg")   # not under figures/: MedEvalKit falls back to images/
    with open(root / "test_2.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["index", "Figure_path", "Caption", "Question", "Choice A", "Choice B", "Choice C", "Choice D",
                    "Answer", "split"])
        w.writerow(["0", "PMC1_F2.jpg", "cap", "What artery?", " A: Right coronary ", " B: Left anterior ",
                    " C: Circumflex ", " D: Mesenteric ", "B", "test"])
    (item,) = load_benchmarks(root)
    assert item["prompt"] == ("\nQuestion: What artery?\nOptions: \n A: Right coronary \n B: Left anterior \n"
                              " C: Circumflex \n D: Mesenteric \n" + MCQ_TAIL)
    assert item["flow"] == "mcq_raw" and item["options"]["B"] == "Left anterior" and item["gold"] == "B"
    # raw flow: the bare first paragraph wins before any <answer> span is read
    assert score_item("A\n\n<answer>B</answer>", item)[0] is False
    assert score_item("A\n\n<answer>B</answer>", {**item, "flow": "mcq"})[0] is True
    assert score_item("B", item)[0] is True


def test_omnimedvqa_open_access_json(tmp_path):
    root = tmp_path / "OmniMedVQA"
    _image_file(root / "Images" / "ds" / "1.png")
    _jsonl(root / "ignored.jsonl", [])
    qa = root / "QA_information" / "Open-access"
    qa.mkdir(parents=True)
    (qa / "ds.json").write_text(json.dumps([
        {"question_id": "q1", "question": "What modality?", "gt_answer": "MRI", "option_A": "CT", "option_B": "MRI",
         "option_C": "X-ray", "image_path": "Images/ds/1.png", "modality_type": "MR", "question_type": "Modality"},
        {"question_id": "q2", "question": "Odd gold?", "gt_answer": "PET", "option_A": "CT", "option_B": "MRI",
         "image_path": "Images/ds/1.png", "modality_type": "CT", "question_type": "Modality"}]))
    items = load_benchmarks(root)
    assert items[0]["mek"] == {"choices": ["A. CT", "B. MRI", "C. X-ray"], "answer": "B"}
    assert items[1]["mek"]["answer"] == "PET"       # gold text that is no option stays text
    assert items[0]["prompt"].endswith("\nA. CT\nB. MRI\nC. X-ray\n" + MCQ_TAIL)
    assert items[0]["category"] == "MR" and score_item("<answer>B</answer>", items[0])[0] is True


def _mmmu_row(subject, n, png, **kw):
    row = {"id": f"validation_{subject}_{n}", "question": "Which vessel? <image 1>",
           "options": "['aorta', 'vena cava']", "answer": "B", "question_type": "multiple-choice",
           "image_1": {"bytes": png, "path": None}, "image_2": None, "subfield": "x"}
    row.update(kw)
    return row


def test_mmmu_health_and_medicine_validation(tmp_path):
    root = tmp_path / "MMMU"
    png = _png()
    subjects = ["Basic_Medical_Science", "Clinical_Medicine", "Diagnostics_and_Laboratory_Medicine", "Pharmacy",
                "Public_Health"]
    for s in subjects:
        _parquet(root / s / "validation-00000-of-00001.parquet", [_mmmu_row(s, 1, png)])
    _parquet(root / "Pharmacy" / "validation-00000-of-00001.parquet", [
        _mmmu_row("Pharmacy", 1, png, question_type="open", options="[]", answer="24"),
        _mmmu_row("Pharmacy", 2, png, options="[\"<img='a.png'>\", \"<img='b.png'>\"]")])
    _parquet(root / "Art" / "validation-00000-of-00001.parquet", [_mmmu_row("Art", 1, png)])
    items = load_benchmarks(f"mmmu={root}", image_cache=tmp_path / "cache")
    assert len(items) == 6 and {i["category"] for i in items} == set(subjects)   # Art is not medical
    first = items[0]
    assert first["prompt"] == ("\nWhich vessel? <image 1>\n\n(A) aorta\n(B) vena cava\n\n\n        " + MCQ_TAIL)
    assert first["mek"]["index2ans"] == {"A": "aorta", "B": "vena cava"} and first["flow"] == "mmmu"
    open_q = next(i for i in items if i["task"] == "open")
    assert open_q["prompt"] == ("\nWhich vessel? <image 1>\n\n        "
                                "Answer the question using a single word or phrase.")
    assert next(i for i in items if i["id"].endswith("Pharmacy_2"))["images"] == []   # image options: no image
    assert score_item("(B)", first)[0] is True


def test_medxpertqa_mm_and_text(tmp_path):
    root = tmp_path / "MedXpertQA"
    _image_file(root / "images" / "a.jpeg")
    _image_file(root / "images" / "b.jpeg")
    opts = {"A": "x", "B": "y", "C": "z", "D": "w", "E": "v"}
    _jsonl(root / "MM" / "test.jsonl", [{"id": "MM-1", "question": "Q?", "options": opts, "label": "C",
                                         "images": ["a.jpeg", "b.jpeg"], "question_type": "Reasoning"}])
    _jsonl(root / "MM" / "dev.jsonl", [{"id": "MM-0", "question": "dev", "options": opts, "label": "A", "images": []}])
    _jsonl(root / "Text" / "test.jsonl", [{"id": "Text-1", "question": "T?", "options": opts, "label": "E",
                                           "question_type": "Understanding"}])
    items = load_benchmarks(root)
    assert [(i["benchmark"], i["id"]) for i in items] == [("MedXpertQA-MM", "MM-1"), ("MedXpertQA-Text", "Text-1")]
    content = build_eval_messages(items[0])[0]["content"]
    assert content.startswith("<image_1>: <image><image_2>: <image>\nQuestion: Q?\nOptions: \nA. x\nB. y\n")
    assert items[1]["images"] == [] and build_eval_messages(items[1])[0]["content"].startswith("\nQuestion: T?")
    assert score_item("<answer>E</answer>", items[1])[0] is True


def test_medqa_medmcqa_pubmedqa_medbullets(tmp_path):
    medqa = tmp_path / "MedQA_USMLE"
    _jsonl(medqa / "phrases_no_exclude_test.jsonl", [
        {"question": "Q", "options": {"A": "a", "B": "b", "C": "c", "D": "d", "E": "e"}, "answer_idx": "D"}])
    (item,) = load_benchmarks(medqa)
    assert item["mek"] == {"choices": ["A. a", "B. b", "C. c", "D. d"], "answer": "D"}  # A-D only

    hub = tmp_path / "MedMCQA"
    row = {"id": "m1", "question": "Q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "choice_type": "single",
           "subject_name": "Anatomy"}
    _parquet(hub / "data" / "validation-00000-of-00001.parquet", [{**row, "cop": 2}])
    original = tmp_path / "medmcqa_orig" / "dev.json"
    _jsonl(original, [{**row, "cop": 3}, {**row, "cop": 1}])  # JSON lines under .json, answers 1-4
    assert load_benchmarks(hub)[0]["mek"]["answer"] == "C"
    assert [i["mek"]["answer"] for i in load_benchmarks(f"medmcqa={original.parent}")] == ["C", "A"]

    pub = tmp_path / "PubMedQA"
    _parquet(pub / "data" / "test-00000-of-00001.parquet", [{"id": "p1", "data": {
        "Question": "Does X help?", "Context": ["c1", "c2"], "Options": {"A": "yes", "B": "no", "C": "maybe"},
        "Correct Option": "B", "Correct Answer": "no"}}])
    (item,) = load_benchmarks(pub)
    assert item["prompt"] == ("Context: c1\nc2\n\nQuestion: Does X help?\nOptions: \nA.yes\nB.no\nC.maybe\n"
                              + MCQ_TAIL)

    op4 = tmp_path / "Medbullets_op4"
    _parquet(op4 / "data" / "train-00000-of-00001.parquet",
             [{"question": "Q4", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer_idx": "A"}])
    op5 = tmp_path / "Medbullets_op5"
    op5.mkdir()
    (op5 / "medbullets_op5.csv").write_text("question,opa,opb,opc,opd,ope,answer_idx\nQ5,a,b,c,d,e,E\n")
    items = load_benchmarks(op4) + load_benchmarks(op5)
    assert [(i["benchmark"], i["mek"]["choices"][0], i["mek"]["answer"]) for i in items] == [
        ("Medbullets-op4", "A.a", "A"), ("Medbullets-op5", "A.a", "E")]


def test_folder_of_release_folders_and_errors(tmp_path):
    root = tmp_path / "benchmarks"
    _jsonl(root / "MedQA_USMLE" / "test.jsonl",
           [{"question": "Q", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer_idx": "B"}])
    _image_file(root / "SLAKE" / "imgs" / "1.png")
    (root / "SLAKE" / "test.json").write_text(json.dumps([{"img_name": "1.png", "question": "Q", "answer": "no",
                                                           "answer_type": "CLOSED", "q_lang": "en"}]))
    (root / "notes").mkdir()
    assert [i["benchmark"] for i in load_benchmarks(root)] == ["MedQA-USMLE", "SLAKE"]
    with pytest.raises(BenchmarkError, match="neither a benchmark release folder"):
        load_benchmarks(root / "notes")
    with pytest.raises(BenchmarkError, match="not found"):
        load_benchmarks(tmp_path / "missing")
    with pytest.raises(BenchmarkError, match="SLAKE needs test.json"):
        load_benchmarks(f"slake={root / 'MedQA_USMLE'}")
    with pytest.raises(BenchmarkError, match="missing field"):
        _jsonl(tmp_path / "bad" / "MedQA" / "test.jsonl", [{"question": "Q"}])
        load_benchmarks(tmp_path / "bad" / "MedQA")
