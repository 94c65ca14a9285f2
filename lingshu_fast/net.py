"""HTTP with a total deadline: `urlopen(request, timeout_s)` bounds a request as a whole.

urllib's `timeout` bounds each socket operation, not the request: a server (or proxy) that sends
one byte every few seconds keeps a read alive for ever. Here every connection a request opens is
watched by a timer that shuts its socket down when the deadline passes; that ends whatever read
is blocked (status line, headers or body), and the caller gets `TimeoutError`. Standard library
only; proxies and HTTPS work as with `urllib.request.urlopen`. Imports nothing from lingshu_fast.
"""
from __future__ import annotations

import http.client
import socket
import threading
import time
import urllib.error
import urllib.request


class Deadline:
    """A wall-clock limit shared by the connections of one request (and its retries)."""

    def __init__(self, seconds: float):
        self.seconds = float(seconds)
        self.at = time.monotonic() + self.seconds
        self.expired = False
        self._timers: list[threading.Timer] = []

    def remaining_s(self) -> float:
        return self.at - time.monotonic()

    def watch(self, sock: socket.socket) -> None:
        timer = threading.Timer(max(self.remaining_s(), 0.0), self._expire, args=(sock,))
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def _expire(self, sock: socket.socket) -> None:
        self.expired = True
        try:
            sock.shutdown(socket.SHUT_RDWR)  # a blocked recv returns at once
        except OSError:
            pass

    def cancel(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()


def opener(deadline: Deadline) -> urllib.request.OpenerDirector:
    """A urllib opener whose connections `deadline` watches from the moment they connect."""

    class Connection(http.client.HTTPConnection):
        def connect(self):
            super().connect()
            deadline.watch(self.sock)

    class SecureConnection(http.client.HTTPSConnection):
        def connect(self):
            super().connect()
            deadline.watch(self.sock)

    class Handler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(Connection, req)

    class SecureHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(SecureConnection, req, context=self._context)

    return urllib.request.build_opener(Handler(), SecureHandler())


def urlopen_read(request: urllib.request.Request, deadline: Deadline) -> bytes:
    """The whole answer body of `request`, or TimeoutError once `deadline` has passed (at any point
    of connecting, waiting or reading). HTTP errors raise urllib.error.HTTPError as usual."""
    if deadline.remaining_s() <= 0:
        raise TimeoutError(f"no complete answer in {deadline.seconds:g} s")
    try:
        with opener(deadline).open(request, timeout=deadline.remaining_s()) as response:
            raw = response.read()
    except (OSError, http.client.HTTPException) as err:
        if deadline.expired and not isinstance(err, urllib.error.HTTPError):
            raise TimeoutError(f"no complete answer in {deadline.seconds:g} s") from None
        raise
    finally:
        deadline.cancel()
    if deadline.expired:  # the read ended because the socket was shut down: the body is cut short
        raise TimeoutError(f"no complete answer in {deadline.seconds:g} s")
    return raw
