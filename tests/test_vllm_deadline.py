"""rl.vllm_timeout_s bounds a whole request: a server that drips one byte at a time (in the headers
or in the body) used to hold the client far beyond it, since urllib's timeout is per socket read.

The local server answers GET /v1/models at once (the client's health check) and drips its answer
to every POST: one byte every 0.25 s, 40 bytes (10 s) in all. The client allows 1 s. Tolerance:
the deadline fires at 1 s; 3 s leaves room for a loaded CI machine, and is far below the 10 s
the drip takes (the old behaviour: a 1 s per-read timeout never fires between bytes 0.25 s apart).
"""
from __future__ import annotations

import json
import socket
import socketserver
import threading
import time

import pytest

from lingshu_fast.rl.vllm_backend import ChatPrompt, VLLMClient, VLLMError

DRIP_INTERVAL_S = 0.25
DRIP_BYTES = 40


class _DripServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, where: str):
        self.where = where  # "headers" or "body": which part of the POST answer is dripped
        self.posts = 0
        super().__init__(("127.0.0.1", 0), _DripHandler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _DripHandler(socketserver.BaseRequestHandler):
    def handle(self):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.request.recv(65536)
            if not chunk:
                return
            data += chunk
        head = data.split(b"\r\n\r\n", 1)[0].decode()
        if head.startswith("GET /v1/models"):
            body = json.dumps({"data": [{"id": "m"}]}).encode()
            self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                                 + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            return
        self.server.posts += 1
        if self.server.where == "headers":
            prefix, dripped = b"", b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * DRIP_BYTES
        else:
            prefix = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                      + str(DRIP_BYTES).encode() + b"\r\nConnection: close\r\n\r\n")
            dripped = b" " * DRIP_BYTES
        try:
            self.request.sendall(prefix)
            for k in range(len(dripped)):
                self.request.sendall(dripped[k:k + 1])
                time.sleep(DRIP_INTERVAL_S)
        except OSError:  # the client hung up: what a deadline does
            return


@pytest.fixture(params=["headers", "body"])
def drip(request):
    server = _DripServer(request.param)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_slow_drip_cannot_outlast_the_deadline(drip):
    """Pins: a request whose answer trickles in (status line and headers, or body) ends with one
    VLLMError naming rl.vllm_timeout_s about 1 s after it started, and is not retried (a retry
    would restart the drip: the deadline covers the call, retries included)."""
    client = VLLMClient(drip.url, vocab_size=100, timeout_s=1.0, retries=3, retry_wait_s=0.1)
    start = time.monotonic()
    with pytest.raises(VLLMError, match=r"got no answer in 1 s \(rl.vllm_timeout_s\)"):
        client.generate([ChatPrompt(messages=[{"role": "user", "content": "hi"}])], n=1, max_new_tokens=1,
                        temperature=1.0, top_p=1.0, stop_token_ids=[2])
    elapsed_s = time.monotonic() - start
    assert 0.9 < elapsed_s < 3.0, elapsed_s
    assert drip.posts == 1


def test_unreachable_server_retries_within_the_deadline():
    """Pins: connection refusals are still retried, but not past the deadline: 4 tries with waits of
    1 + 2 + 4 s used to take 7 s; with 1.5 s allowed the client gives up after the 1 s wait (the
    2 s one would pass the deadline; on a slow machine already the 1 s one) and says it cannot reach
    the server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once the socket closes
    start = time.monotonic()
    with pytest.raises(VLLMError, match=r"cannot reach the vLLM server .* after [12] tries"):
        VLLMClient(url, vocab_size=100, timeout_s=1.5, retries=3, retry_wait_s=1.0)
    assert time.monotonic() - start < 3.0
