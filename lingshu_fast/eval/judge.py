"""The optional LLM judge for open questions (`eval.judge_url`): an OpenAI-compatible chat-completions
endpoint asked whether a response means the gold answer.

- `medevalkit` scoring asks it the way MedEvalKit's `use_llm_judge` does (its comparison prompt, a
  `<judge>0</judge>` reply meaning correct, temperature 0) and takes its verdict instead of exact match.
- `lenient` scoring asks only when normalised exact match failed, with a one-word prompt.
- Every request has a total deadline (`eval.judge_timeout_s`), not just socket timeouts: a server
  that sends a byte every few seconds cannot hold the eval.
- An API key is sent only when `eval.judge_api_key_env` names the environment variable holding it:
  a key meant for one provider is never sent to an arbitrary `judge_url`.
"""
from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Optional

from lingshu_fast.eval import medevalkit

_MAX_REPLY_BYTES = 1 << 20

# MedEvalKit's get_compare_messages, same wording (it decides what the judge accepts).
_MEDEVALKIT_PROMPT = """
Your task is to determine whether the user's answer is correct based on the provided questions and standard answers (for example, if the user expresses a similar meaning to the standard answer, or another interpretation of the standard answer, it is considered correct.)

The question is: {question}

The standard answer: {answer}

The user's answer: {response}

Please strictly follow the following format for output(0 represents correct, 1 represents incorrect):
<think>{{your concise think step}}</think>
<judge>{{0/1}}</judge>

for example:
<think>The standard answer is right, and the user's answer is right frontal lobe, they express the same meaning, so it is correct.</think>
<judge>0</judge>
    """

_LENIENT_PROMPT = """You grade answers to medical questions. Decide whether the candidate answer means the
same as the reference answer (synonyms, abbreviations and equivalent phrasings count as the same;
a different or less specific finding does not).

Question: {question}
Reference answer: {answer}
Candidate answer: {prediction}

Reply with exactly one word: correct or incorrect."""


@dataclass(frozen=True)
class Judge:
    """Where and how to ask. `api_key` is the key itself (read by the caller from the variable
    `eval.judge_api_key_env` names), or None to send no Authorization header."""
    url: str
    model: str = "gpt-4.1-2025-04-14"  # MedEvalKit's default judge model
    timeout_s: float = 60.0
    api_key: Optional[str] = None

    def endpoint(self) -> str:
        url = self.url.rstrip("/")
        return url if url.endswith("/chat/completions") else url + "/chat/completions"

    def chat(self, prompt: str, *, max_tokens: int) -> str:
        body = {"model": self.model, "temperature": 0, "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": prompt}]}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        reply = post_json(self.endpoint(), body, headers=headers, deadline_s=self.timeout_s)
        try:
            return str(reply["choices"][0]["message"]["content"])
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"LLM judge {self.endpoint()}: reply has no choices[0].message.content") from None

    def medevalkit_verdict(self, question: str, response: str, answer: str) -> bool:
        """MedEvalKit's rule: the `<judge>` span (the whole reply when there is none) equals "0"."""
        prompt = _MEDEVALKIT_PROMPT.format(question=question, answer=answer, response=response)
        return medevalkit.joined_spans(self.chat(prompt, max_tokens=4000), "judge") == "0"

    def lenient_verdict(self, question: str, prediction: str, answer: str) -> bool:
        reply = self.chat(_LENIENT_PROMPT.format(question=question, answer=answer, prediction=prediction),
                          max_tokens=8)
        verdict = reply.strip().lower().strip(".!* ")
        if verdict.startswith(("incorrect", "not correct")):
            return False
        if verdict.startswith("correct"):
            return True
        raise ValueError(f"judge reply is neither 'correct' nor 'incorrect': {verdict[:80]!r}")


def post_json(url: str, payload: dict, *, headers: dict, deadline_s: float) -> dict:
    """POST JSON and parse the JSON reply, all within `deadline_s` seconds in total (connect, send,
    headers and body): the exchange runs in a worker thread and is cut off at the deadline.
    Raises TimeoutError past the deadline, OSError on a network or HTTP error, ValueError on a bad reply."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"LLM judge url {url!r} is not an http(s) URL")
    connection_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = connection_cls(parts.hostname, parts.port, timeout=deadline_s)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    box: dict = {}

    def exchange():
        try:
            conn.request("POST", path, body=json.dumps(payload).encode("utf-8"), headers=headers)
            response = conn.getresponse()
            box["reply"] = (response.status, response.read(_MAX_REPLY_BYTES + 1))
        except BaseException as err:  # handed to the caller's thread below
            box["error"] = err

    worker = threading.Thread(target=exchange, name="llm-judge", daemon=True)
    worker.start()
    worker.join(deadline_s)
    if worker.is_alive():
        _cut(conn)
        worker.join(1.0)
        raise TimeoutError(f"LLM judge {url}: no complete reply within {deadline_s:g} s")
    conn.close()
    if "error" in box:
        raise box["error"]
    status, data = box["reply"]
    if status != 200:
        raise OSError(f"LLM judge {url}: HTTP {status}")
    if len(data) > _MAX_REPLY_BYTES:
        raise ValueError(f"LLM judge {url}: reply larger than {_MAX_REPLY_BYTES} bytes")
    return json.loads(data.decode("utf-8"))


def _cut(conn: http.client.HTTPConnection) -> None:
    """Unblock a worker stuck in recv: shutdown wakes a blocked socket call, close alone may not."""
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    conn.close()


def judge_from_config(eval_cfg) -> Optional[Judge]:
    """The LLM judge of `eval.judge_url`, or None. The API key comes only from the environment
    variable `eval.judge_api_key_env` names (none sent without it); naming an unset variable is a
    ConfigError rather than a silent unauthenticated request."""
    from lingshu_fast.config import ConfigError

    if not eval_cfg.judge_url:
        return None
    key = None
    if eval_cfg.judge_api_key_env:
        key = os.environ.get(eval_cfg.judge_api_key_env)
        if not key:
            raise ConfigError(f"eval.judge_api_key_env: the environment variable {eval_cfg.judge_api_key_env} "
                              "is not set; export it or drop the key to send no API key")
    return Judge(url=eval_cfg.judge_url, model=eval_cfg.judge_model, timeout_s=eval_cfg.judge_timeout_s,
                 api_key=key)
