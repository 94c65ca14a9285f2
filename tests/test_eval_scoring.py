"""Lenient eval scoring, our benchmark files, reports and the VQA-RAD/SLAKE converter
(lingshu_fast/eval/scoring.py, benchmark_files.py, report.py, scripts/convert_vqa_rad_slake.py).
MedEvalKit scoring is pinned in test_eval_medevalkit.py, the judge in test_eval_judge.py.

Pins: which tricky predictions count as right (a wrong row silently inflates or deflates a reported
accuracy), that bad benchmark files fail with file:line, and that reports count exactly.
"""
import importlib.util
import json
from pathlib import Path

import pytest

from lingshu_fast.eval.benchmark_files import BenchmarkError, build_eval_messages, load_benchmark
from lingshu_fast.eval.report import format_table, report, report_metrics, write_report
from lingshu_fast.eval.scoring import score_item, score_predictions

MCQ = {"task": "mcq", "question": "Most likely diagnosis?",
       "options": ["Pneumonia", "Viral pneumonia", "Tuberculosis", "Lung cancer"], "answer": "C"}
YESNO = {"task": "yesno", "question": "Is there a pneumothorax?", "answer": "no"}
OPEN = {"task": "open", "question": "Which organ is enlarged?", "answer": ["the liver", "hepar"]}

SCORE_TABLE = [
    (MCQ, "C", True, "C"), (MCQ, "The answer is (C).", True, "C"), (MCQ, "Tuberculosis", True, "C"),
    (MCQ, "I think A is wrong, the answer is C", True, "C"),
    (MCQ, "A and C", False, None),                                  # multiple letters: wrong
    (MCQ, "<think>maybe B</think><answer>C</answer>", True, "C"),
    (MCQ, "\\boxed{\\text{C}}", True, "C"), (MCQ, "（Ｃ）", True, "C"),
    (MCQ, "tubercolosis", True, "C"),                               # difflib fallback (eval only)
    (MCQ, "Pneumonia", False, "A"), (MCQ, "", False, None), (MCQ, None, False, None),
    ({**MCQ, "answer": "Tuberculosis"}, "C", True, "C"),            # gold given as option text
    (YESNO, "No.", True, "no"), (YESNO, "NO evidence of pneumothorax", True, "no"),
    (YESNO, "\u201cno\u201d", True, "no"), (YESNO, "否", True, "no"), (YESNO, "Yes, there is", False, "yes"),
    (YESNO, "There is no node", True, "no"), (YESNO, "yes or no", False, None),
    (OPEN, "The Liver.", True, "The Liver."), (OPEN, "<answer>Hepar</answer>", True, "Hepar"),
    (OPEN, "\\boxed{liver}", True, "liver"), (OPEN, "the answer is: LIVER!", True, "LIVER!"),
    (OPEN, "spleen", False, "spleen"), (OPEN, "", False, None),
]


@pytest.mark.parametrize("item,prediction,correct,extracted", SCORE_TABLE)
def test_lenient_score_item_table(item, prediction, correct, extracted):
    """`eval.scoring: lenient` keeps these rules (the RL rewards' extractor)."""
    assert score_item(prediction, item, scoring="lenient") == (correct, extracted)


@pytest.mark.parametrize("item,prediction,lenient,medevalkit", [
    (MCQ, "(C)", True, False), (MCQ, "A and C", False, False), (MCQ, "tubercolosis", True, True),
    (YESNO, "There is no node", True, True), (YESNO, "Not seen", False, True), (YESNO, "Yes, there is", False, False),
    (OPEN, "The Liver.", True, False), (OPEN, "the liver", True, True), (OPEN, "hepar", True, True),
])
def test_the_two_modes_differ_where_documented(item, prediction, lenient, medevalkit):
    """Plain items follow the mcq / vqa flows under medevalkit; the README lists these differences."""
    assert score_item(prediction, item, scoring="lenient")[0] is lenient
    assert score_item(prediction, item)[0] is medevalkit


def _write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_load_benchmark_resolves_and_infers(tmp_path):
    """Relative images resolve against the file's folder; task inferred; other task labels become
    categories; golds normalised (letter / yes-no / accepted list)."""
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"x")
    path = _write(tmp_path / "radq.jsonl", [
        {"question": "Q1", "options": {"A": "x", "B": "y"}, "answer": "y", "images": "img/a.png"},
        {"question": "Q2", "answer": "Yes", "task": "lesion_presence"},
        {"question": "Q3", "answer": 12, "id": "q3"},
        "",
    ])
    items = load_benchmark(path)
    assert [i["task"] for i in items] == ["mcq", "yesno", "open"]
    assert [i["gold"] for i in items] == ["B", "yes", ["12"]]
    assert items[0]["images"] == [str(tmp_path / "img" / "a.png")]
    assert items[1]["category"] == "lesion_presence" and items[0]["category"] is None
    assert [i["id"] for i in items] == ["radq:1", "radq:2", "q3"] and items[0]["benchmark"] == "radq"


@pytest.mark.parametrize("row,message", [
    ("{not json", "radq.jsonl:2: invalid JSON"),
    ({"answer": "x"}, "radq.jsonl:2: 'question' must be"),
    ({"question": "q"}, "'answer' is missing"),
    ({"question": "q", "options": ["x", "y"], "answer": "E"}, "neither an option letter"),
    ({"question": "q", "task": "mcq", "answer": "A"}, "needs 'options'"),
    ({"question": "q", "options": ["x"], "answer": "A"}, "at least two"),
    ({"question": "q", "task": "yesno", "answer": "maybe"}, "needs answer yes or no"),
    ({"question": "q", "answer": "a", "images": ["missing.png"]}, "image not found: 'missing.png'"),
    ({"question": "<image><image>q", "answer": "a"}, "2 <image> markers but 0 images"),
    ({"question": "q", "answer": "..."}, "empty after normalisation"),
    ([1, 2], "expected a JSON object"),
])
def test_load_benchmark_errors_name_file_and_line(tmp_path, row, message):
    path = _write(tmp_path / "radq.jsonl", [{"question": "fine", "answer": "yes"}, row])
    with pytest.raises(BenchmarkError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_benchmark(path)


def test_load_benchmark_missing_or_empty_file(tmp_path):
    with pytest.raises(BenchmarkError, match="not found"):
        load_benchmark(tmp_path / "nope.jsonl")
    with pytest.raises(BenchmarkError, match="no questions"):
        load_benchmark(_write(tmp_path / "empty.jsonl", [""]))


def test_build_eval_messages():
    """MedEvalKit's prompts for plain items: images first as one marker per item image (numbered
    when several), lettered options "A. text", its instruction per task; `reasoning` asks for \\boxed{}."""
    (item,) = [load_item({**MCQ, "images": ["/a.png"]})]
    (msg,) = build_eval_messages(item)
    assert msg["role"] == "user"
    assert msg["content"] == ("<image>\nQuestion: Most likely diagnosis?\nOptions: \nA. Pneumonia\n"
                              "B. Viral pneumonia\nC. Tuberculosis\nD. Lung cancer\n"
                              "Answer with the option's letter from the given choices directly.")
    (msg,) = build_eval_messages(load_item({**YESNO, "images": ["/a.png", "/b.dcm"]}, reasoning=True))
    assert msg["content"] == ('<image_1>: <image><image_2>: <image>Is there a pneumothorax?\n'
                              'Please output "yes" or "no" and put the answer in one "\\boxed{}".')
    (msg,) = build_eval_messages(load_item({"question": "Left <image> right <image>", "answer": "x",
                                            "images": ["/a", "/b"]}))
    assert msg["content"] == "Left <image> right <image>\nPlease answer the question concisely."


def load_item(raw, reasoning=False):
    from lingshu_fast.eval.benchmark_files import validate_item
    return validate_item(raw, "test", image_root=Path("/"), check_images=False, reasoning=reasoning)


def test_report_counts_table_and_files(tmp_path):
    items = [dict(MCQ, benchmark="pmc"), dict(YESNO, benchmark="rad", category="closed"),
             dict(OPEN, benchmark="rad", category="open"), dict(YESNO, benchmark="rad", category="closed")]
    rows = score_predictions(items, ["C", "no", "kidney", "yes"])
    rep = report(rows)
    assert rep["benchmarks"]["pmc"]["accuracy"] == 1.0 and rep["benchmarks"]["pmc"]["total"] == 1
    rad = rep["benchmarks"]["rad"]
    assert (rad["correct"], rad["total"]) == (1, 3)
    assert rad["by_task"]["yesno"] == {"accuracy": 0.5, "correct": 1, "total": 2}
    assert rad["by_category"]["open"]["correct"] == 0
    assert rep["overall"]["accuracy"] == pytest.approx(2 / 4)
    assert rep["overall"]["macro_accuracy"] == pytest.approx((1 + 1 / 3) / 2)
    assert report_metrics(rep) == {"eval/pmc/accuracy": 1.0, "eval/rad/accuracy": pytest.approx(1 / 3),
                                   "eval/overall/accuracy": 0.5}
    table = format_table(rep)
    assert "pmc" in table and "33.33%" in table and "overall (macro)" in table and "Lingshu-7B" in table
    assert rep["scoring"] == "medevalkit" and rep["benchmarks"]["rad"]["lingshu_7b_reported"] is None
    paths = write_report(rep, rows, tmp_path / "run", tag="eval_stage3")
    assert json.loads(paths["report"].read_text()) == json.loads(json.dumps(rep))
    wrong = [json.loads(line) for line in paths["wrong"].read_text().splitlines()]
    assert [w["prediction"] for w in wrong] == ["kidney", "yes"] and wrong[0]["extracted"] == "kidney"
    with pytest.raises(ValueError, match="2 items but 1 predictions"):
        score_predictions(items[:2], ["C"])


def _load_converter():
    path = Path(__file__).resolve().parents[1] / "scripts" / "convert_vqa_rad_slake.py"
    spec = importlib.util.spec_from_file_location("convert_vqa_rad_slake", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_converter_slake_and_vqa_rad_layouts(tmp_path):
    """SLAKE (img_name, q_lang) and VQA-RAD (image_name, numeric answers) records become a
    benchmark load_benchmark accepts: yes/no -> yesno, other CLOSED and OPEN -> open."""
    conv = _load_converter()
    (tmp_path / "imgs" / "xmlab1").mkdir(parents=True)
    (tmp_path / "imgs" / "xmlab1" / "source.jpg").write_bytes(b"x")
    (tmp_path / "imgs" / "synpic1.jpg").write_bytes(b"x")
    records = [
        {"img_name": "xmlab1/source.jpg", "question": "Is this a CT?", "answer": "Yes", "answer_type": "CLOSED",
         "q_lang": "en", "qid": 1},
        {"img_name": "xmlab1/source.jpg", "question": "Which organ?", "answer": "Liver", "answer_type": "OPEN",
         "q_lang": "en", "qid": 2},
        {"img_name": "xmlab1/source.jpg", "question": "这是CT吗?", "answer": "是", "answer_type": "CLOSED",
         "q_lang": "zh", "qid": 3},
        {"image_name": "synpic1.jpg", "question": "How many lesions?", "answer": 2, "answer_type": "CLOSED"},
        {"image_name": "synpic1.jpg", "question": "Left or right?", "answer": "left", "answer_type": "CLOSED"},
    ]
    out = tmp_path / "bench" / "slake.jsonl"
    counts = conv.convert_records(records, tmp_path / "imgs", out, lang="en")
    assert counts == {"written": 4, "yesno": 1, "open": 3, "skipped_lang": 1, "missing_images": 0}
    items = load_benchmark(out)
    assert [(i["task"], i["category"], i["gold"]) for i in items] == [
        ("yesno", "closed", "yes"), ("open", "open", ["Liver"]), ("open", "closed", ["2"]),
        ("open", "closed", ["left"])]
    assert items[0]["images"][0].endswith("imgs/xmlab1/source.jpg") and Path(items[0]["images"][0]).is_file()
    assert conv.main(["--json", str(_write(tmp_path / "r.json", [json.dumps(records)])),
                      "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "all.jsonl")]) == 0
    assert len(load_benchmark(tmp_path / "all.jsonl")) == 5
    with pytest.raises(SystemExit, match="image not found"):
        conv.convert_records([{**records[0], "img_name": "nope.jpg"}], tmp_path / "imgs", tmp_path / "x.jsonl")


def test_demo_benchmark_loads_and_scores(tmp_path):
    """The shipped demo benchmark (lingshu_fast.data.demo_data) loads, and gold answers score 100 %."""
    from lingshu_fast.data.demo_data import build_demo_dataset
    paths = build_demo_dataset(tmp_path / "demo")
    items = load_benchmark(paths["eval"])
    golds = [i["gold"] if isinstance(i["gold"], str) else i["gold"][0] for i in items]
    rep = report(score_predictions(items, golds))
    assert rep["overall"]["accuracy"] == 1.0 and rep["overall"]["total"] == len(items)


def test_plain_file_declares_or_infers_its_flow(tmp_path):
    """A file named like PMC-VQA follows mcq_raw, one named SLAKE the slake flow (its closed/open
    split from `category`), others mcq / vqa by task; an item may declare `flow`; a flow that
    does not fit the task is an error naming file:line."""
    rows = [{"question": "Q", "options": ["x", "y"], "answer": "B"},
            {"question": "Q", "answer": "Left", "category": "closed"}]
    pmc = load_benchmark(_write(tmp_path / "PMC-VQA.jsonl", rows[:1]))
    slake = load_benchmark(_write(tmp_path / "slake.jsonl", rows[1:]))
    plain = load_benchmark(_write(tmp_path / "mine.jsonl", rows))
    assert [i["flow"] for i in pmc + slake + plain] == ["mcq_raw", "slake", "mcq", "vqa"]
    assert slake[0]["mek"] == {"answer": ["Left"], "answer_type": "CLOSED"}
    assert slake[0]["prompt"] == "Q\nAnswer the question using a single word or phrase."
    assert score_item("left.", slake[0])[0] is True and score_item("left.", plain[1])[0] is False
    declared = load_benchmark(_write(tmp_path / "d.jsonl", [{**rows[0], "flow": "mcq_raw"}]))
    assert declared[0]["flow"] == "mcq_raw"
    with pytest.raises(BenchmarkError, match=r"d2.jsonl:1: flow 'vqa' does not fit task 'mcq'"):
        load_benchmark(_write(tmp_path / "d2.jsonl", [{**rows[0], "flow": "vqa"}]))
    with pytest.raises(BenchmarkError, match="not one a question file can follow"):
        load_benchmark(_write(tmp_path / "d3.jsonl", [{**rows[0], "flow": "mmmu"}]))


def test_table_shows_the_paper_figure():
    rows = score_predictions([dict(MCQ, benchmark="VQA-RAD"), dict(MCQ, benchmark="Medbullets-op4"),
                              dict(MCQ, benchmark="mine")], ["C", "A", "C"])
    rep = report(rows)
    table = format_table(rep)
    line = {row.split()[0]: row for row in table.splitlines() if row.split()}
    assert line["VQA-RAD"].rstrip().endswith("67.9%") and line["Medbullets-op4"].rstrip().endswith("56.2%")
    assert line["mine"].rstrip().endswith("-") and "arXiv 2506.07044" in table
    assert rep["benchmarks"]["VQA-RAD"]["lingshu_7b_reported"] == 67.9
