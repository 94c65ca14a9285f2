"""The optional LLM judge (lingshu_fast/eval/judge.py, scoring.py) against local
fake servers on 127.0.0.1.

Pins: (1) a server that drips a byte every 0.2 s — headers or body — is cut off at the request's total
deadline (before, only socket timeouts applied and such a server held an eval for minutes); the
tolerance is the deadline plus 1.5 s for thread start-up on a loaded 2-core machine. (2) No API key
is sent unless `eval.judge_api_key_env` names the variable holding it (OPENAI_API_KEY used to go to
any judge_url). (3) Under medevalkit scoring the judge's `<judge>0</judge>` decides open questions
(as MedEvalKit's use_llm_judge), under lenient it is asked only after exact match fails; yes/no and
multiple-choice items never reach it; a failed judge keeps the rule's verdict.
"""
import http.server
import json
import threading
import time

import pytest

from lingshu_fast.config import ConfigError, load_config
from lingshu_fast.eval.judge import Judge, judge_from_config, post_json
from lingshu_fast.eval.scoring import score_item

OPEN = {"question": "Which organ is enlarged?", "task": "open", "flow": "vqa", "mek": {"answer": "liver"},
        "gold": ["liver"]}
YESNO = {"question": "Is there a pneumothorax?", "task": "yesno", "flow": "vqa", "mek": {"answer": "no"},
         "gold": "no"}


class _Judge(http.server.BaseHTTPRequestHandler):
    seen: list = []
    reply = "<think>same</think><judge>0</judge>"

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Judge.seen.append((self.path, dict(self.headers), body))
        prompt = body["messages"][0]["content"]
        if "broken" in prompt:
            self.send_response(500)
            self.end_headers()
            return
        content = _Judge.reply(prompt) if callable(_Judge.reply) else _Judge.reply
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class _Drip(http.server.BaseHTTPRequestHandler):
    """Answers one byte every 0.2 s: the status line itself (mode 'headers') or a long body."""
    mode = "body"

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
        data = head if _Drip.mode == "headers" else b"{" + b" " * 499
        if _Drip.mode == "body":
            self.wfile.write(head)
        try:
            for i in range(60):
                self.wfile.write(data[i:i + 1])
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:  # the client hung up: the point of the test
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    servers = []

    def start(handler):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("mode", ["headers", "body"])
def test_slow_drip_server_is_cut_at_the_total_deadline(serve, mode):
    _Drip.mode = mode
    url = serve(_Drip)
    judge = Judge(url=url, timeout_s=1.0)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="within 1 s"):
        post_json(judge.endpoint(), {"x": 1}, headers={"Content-Type": "application/json"}, deadline_s=1.0)
    assert time.monotonic() - start < 2.5
    start = time.monotonic()
    assert score_item("hepatic organ", OPEN, judge=judge) == (False, "hepatic organ")  # rule verdict kept
    assert time.monotonic() - start < 2.5


def test_api_key_only_from_the_named_variable(serve, monkeypatch):
    url = serve(_Judge)
    _Judge.seen.clear()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-leak")
    monkeypatch.setenv("MY_JUDGE_KEY", "secret-1")
    cfg = load_config("tiny-base", [f"eval.judge_url={url}"])
    judge = judge_from_config(cfg.eval)
    assert judge.api_key is None
    judge.medevalkit_verdict("q", "r", "a")
    assert "Authorization" not in _Judge.seen[-1][1]
    cfg = load_config("tiny-base", [f"eval.judge_url={url}", "eval.judge_api_key_env=MY_JUDGE_KEY",
                                    "eval.judge_model=local-judge", "eval.judge_timeout_s=5"])
    judge = judge_from_config(cfg.eval)
    judge.medevalkit_verdict("q", "r", "a")
    path, headers, body = _Judge.seen[-1]
    assert headers["Authorization"] == "Bearer secret-1" and body["model"] == "local-judge"
    assert path == "/v1/chat/completions" and judge.timeout_s == 5.0
    monkeypatch.delenv("MY_JUDGE_KEY")
    with pytest.raises(ConfigError, match="MY_JUDGE_KEY is not set"):
        judge_from_config(cfg.eval)
    with pytest.raises(ConfigError, match="judge_timeout_s"):
        load_config("tiny-base", ["eval.judge_timeout_s=0"])
    with pytest.raises(ConfigError, match="http"):
        load_config("tiny-base", ["eval.judge_url=file:///etc/passwd"])


def _judge_replying(serve, monkeypatch, reply) -> Judge:
    """A judge client on a fresh fake server answering `reply(prompt)` (restored after the test)."""
    monkeypatch.setattr(_Judge, "reply", reply)
    _Judge.seen.clear()
    return Judge(url=serve(_Judge))


def test_medevalkit_judge_decides_open_questions(serve, monkeypatch):
    judge = _judge_replying(serve, monkeypatch,
                            lambda prompt: "<judge>0</judge>" if "hepatic organ" in prompt else "<judge>1</judge>")
    assert score_item("Hepatic organ", OPEN, judge=judge) == (True, "hepatic organ")
    assert score_item("liver", OPEN, judge=judge)[0] is False   # the judge, not exact match, decides
    assert score_item("no", YESNO, judge=judge)[0] is True      # yes/no: rules only, no request
    prompt = _Judge.seen[0][2]["messages"][0]["content"]
    assert "The standard answer: liver" in prompt and "The user's answer: hepatic organ" in prompt
    assert len(_Judge.seen) == 2 and _Judge.seen[0][2]["temperature"] == 0
    assert score_item("broken", OPEN, judge=judge)[0] is False   # HTTP 500: exact-match verdict kept
    monkeypatch.setattr(_Judge, "reply", "0")                     # no <judge> span: the whole reply
    assert score_item("hepar", OPEN, judge=judge)[0] is True


def test_lenient_judge_only_after_exact_match_fails(serve, monkeypatch):
    judge = _judge_replying(serve, monkeypatch,
                            lambda prompt: "Correct." if "Candidate answer: hepatic organ" in prompt else "incorrect")
    assert score_item("The Liver.", OPEN, scoring="lenient", judge=judge) == (True, "The Liver.")
    assert _Judge.seen == []
    assert score_item("hepatic organ", OPEN, scoring="lenient", judge=judge) == (True, "hepatic organ")
    assert score_item("spleen", OPEN, scoring="lenient", judge=judge) == (False, "spleen")
    assert score_item("broken", OPEN, scoring="lenient", judge=judge) == (False, "broken")
    assert len(_Judge.seen) == 3
