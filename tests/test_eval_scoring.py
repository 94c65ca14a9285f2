"""Eval scoring (MedEvalKit rules), benchmark files, reports and the VQA-RAD/SLAKE converter
(lingshu_fast/eval/scoring.py, lingshu_fast/eval/bench_format.py, scripts/convert_vqa_rad_slake.py).

Pins: which tricky predictions count as right (a wrong row silently inflates or deflates a reported
accuracy), that bad benchmark files fail with file:line, and that reports count exactly.
"""
import http.server
import importlib.util
import json
import threading
from pathlib import Path

import pytest

from lingshu_fast.eval.bench_format import (
    BenchmarkError, build_eval_messages, format_table, load_benchmark, report, report_metrics,
    write_report,
)
from lingshu_fast.eval.scoring import llm_judge, score_item, score_predictions

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
def test_score_item_table(item, prediction, correct, extracted):
    assert score_item(prediction, item) == (correct, extracted)


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
    """Images first as markers, options lettered, one instruction per task; reasoning adds the
    RL answer format."""
    item = {**MCQ, "images": ["/a.png", "/b.dcm"]}
    (msg,) = build_eval_messages(item)
    assert msg["role"] == "user"
    assert msg["content"].startswith("<image><image>Question: Most likely diagnosis?\nOptions:\nA. Pneumonia\n")
    assert "D. Lung cancer\nAnswer with the option's letter" in msg["content"]
    (msg,) = build_eval_messages({**YESNO, "images": ["/a.png"]}, reasoning=True)
    assert msg["content"].startswith("<image>Is there a pneumothorax?\nPlease answer yes or no.")
    assert "<answer>" in msg["content"]
    (msg,) = build_eval_messages({"question": "Left <image> right <image>", "answer": "x", "images": ["/a", "/b"]})
    assert msg["content"].count("<image>") == 2 and msg["content"].startswith("Left")


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
    assert "pmc" in table and "33.33%" in table and "overall (macro)" in table
    paths = write_report(rep, rows, tmp_path / "run", tag="eval_stage3")
    assert json.loads(paths["report"].read_text()) == json.loads(json.dumps(rep))
    wrong = [json.loads(line) for line in paths["wrong"].read_text().splitlines()]
    assert [w["prediction"] for w in wrong] == ["kidney", "yes"] and wrong[0]["extracted"] == "kidney"
    with pytest.raises(ValueError, match="2 items but 1 predictions"):
        score_predictions(items[:2], ["C"])


class _FakeJudge(http.server.BaseHTTPRequestHandler):
    requests: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _FakeJudge.requests.append((self.path, body))
        prompt = body["messages"][0]["content"]
        if "Candidate answer: broken" in prompt:
            self.send_response(500)
            self.end_headers()
            return
        verdict = "Correct." if "Candidate answer: hepatic organ" in prompt else "incorrect"
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": verdict}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_llm_judge_against_local_fake_server():
    """Only non-exact open answers reach the judge; its verdict is parsed; an HTTP error keeps
    the exact-match verdict instead of failing the eval. The server is a local fake on 127.0.0.1."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        _FakeJudge.requests.clear()
        assert score_item("liver", OPEN, judge_url=url) == (True, "liver")       # exact: no request
        assert _FakeJudge.requests == []
        assert score_item("hepatic organ", OPEN, judge_url=url) == (True, "hepatic organ")
        assert score_item("spleen", OPEN, judge_url=url) == (False, "spleen")
        assert score_item("broken", OPEN, judge_url=url) == (False, "broken")
        assert score_item("Yes", YESNO, judge_url=url) == (False, "yes")         # judge only for open
        assert [p for p, _ in _FakeJudge.requests] == ["/v1/chat/completions"] * 3
        assert llm_judge("q", "hepatic organ", "liver", url=url + "/chat/completions") is True
    finally:
        server.shutdown()
        server.server_close()


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
