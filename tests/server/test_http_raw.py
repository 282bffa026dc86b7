"""Robustness over raw sockets: what a misbehaving client can send, and that the server still
answers a well-behaved one afterwards."""
import json
import socket
import time

import pytest

from conftest import wait_idle


def connect(server, timeout=10.0):
    s = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


class Reader:
    """Reads HTTP/1.1 responses (Content-Length or chunked) off one socket."""

    def __init__(self, sock):
        self.sock, self.buf = sock, b""

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("connection closed")
        self.buf += data

    def _line(self):
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _take(self, n):
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def response(self):
        status = int(self._line().split()[1])
        headers = {}
        while True:
            line = self._line()
            if not line:
                break
            k, v = line.decode().split(":", 1)
            headers[k.strip().lower()] = v.strip()
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                n = int(self._line(), 16)
                if n == 0:
                    self._line()
                    break
                body += self._take(n)
                self._take(2)
        else:
            body = self._take(int(headers.get("content-length", "0")))
        return status, headers, body


def request(method, path, body=None, extra=""):
    data = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    head = f"{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n{extra}"
    head += f"Content-Length: {len(data)}\r\n\r\n" if body is not None else "\r\n"
    return head.encode() + data


def roundtrip(server, raw):
    with connect(server) as s:
        s.sendall(raw)
        return Reader(s).response()


def error_of(body):
    e = json.loads(body)["error"]
    assert set(e) == {"message", "type", "param", "code"}, e
    return e


def assert_alive(server):
    status, _, body = roundtrip(server, request("GET", "/health"))
    assert status == 200 and json.loads(body) == {"status": "ok"}
    status, _, body = roundtrip(server, request("POST", "/v1/completions",
                                                {"model": "smollm2", "prompt": "Hi", "max_tokens": 1}))
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 1


def test_bad_json(server):
    status, _, body = roundtrip(server, request("POST", "/v1/completions", b'{"model": "smollm2", "prompt": '))
    assert status == 400
    e = error_of(body)
    assert e["type"] == "invalid_request_error" and "JSON" in e["message"]
    status, _, body = roundtrip(server, request("POST", "/v1/chat/completions", b"[1, 2]"))
    assert status == 400 and error_of(body)


@pytest.mark.parametrize("endpoint,body,param", [
    ("/v1/completions", {"model": "smollm2", "prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ("/v1/completions", {"model": "smollm2", "prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"model": "smollm2", "prompt": {"a": 1}}, "prompt"),
    ("/v1/completions", {"model": "smollm2", "prompt": [1, "x"]}, "prompt"),
    ("/v1/completions", {"model": 7, "prompt": "x"}, "model"),
    ("/v1/completions", {"model": "smollm2", "prompt": "x", "stream": "yes"}, "stream"),
    ("/v1/completions", {"model": "smollm2", "prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"model": "smollm2", "prompt": "x", "logprobs": 9}, "logprobs"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/chat/completions", {"model": "smollm2"}, "messages"),
    ("/v1/load_lora_adapter", {"lora_name": 5, "lora_path": "x"}, "lora_name"),
    ("/v1/load_lora_adapter", {"lora_name": "x"}, "lora_path"),
])
def test_wrong_types_name_the_param(server, endpoint, body, param):
    status, _, raw = roundtrip(server, request("POST", endpoint, body))
    assert status == 400
    assert error_of(raw)["param"] == param


def test_unknown_model(server):
    for ep, body in (("/v1/completions", {"model": "nope", "prompt": "x"}),
                     ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
                     ("/v1/completions", {"model": "", "prompt": "x"}),
                     ("/v1/completions", {"model": "smollm2:nope", "prompt": "x"})):
        status, _, raw = roundtrip(server, request("POST", ep, body))
        assert status == 404
        e = error_of(raw)
        assert e["param"] == "model" and "does not exist" in e["message"]


def test_huge_body_413(server):
    # The server runs with --max-body-mb 1: it answers from the headers, before the body.
    with connect(server) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 5000000\r\n\r\n" + b"x" * 1000)
        status, _, body = Reader(s).response()
    assert status == 413 and error_of(body)
    # Chunked past the limit too.
    with connect(server) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(40):
                s.sendall(b"10000\r\n" + b"y" * 0x10000 + b"\r\n")
        except OSError:
            pass  # the server may close while we still write
        status, _, _ = Reader(s).response()
    assert status == 413
    assert_alive(server)


def test_truncated_then_close(server):
    for raw in (b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Le",
                b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{\"model\":"):
        s = connect(server)
        s.sendall(raw)
        s.close()
    time.sleep(0.1)
    assert_alive(server)


def test_slow_client_times_out(server):
    # --header-timeout 2: a client that never finishes its headers gets 408 and is closed.
    with connect(server, timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n")
        t0 = time.time()
        status, _, body = Reader(s).response()
        assert status == 408 and error_of(body)
        assert 1.0 < time.time() - t0 < 8.0
        with pytest.raises((EOFError, ConnectionError)):
            Reader(s).response()
    assert_alive(server)


def test_pipelined_answers_in_order(server):
    a = request("POST", "/v1/completions", {"model": "smollm2", "prompt": "1, 2, 3,", "max_tokens": 3,
                                             "temperature": 0})
    b = request("POST", "/v1/completions", {"model": "smollm2", "prompt": "1, 2, 3,", "max_tokens": 1,
                                             "temperature": 0})
    c = request("GET", "/health")
    with connect(server) as s:
        s.sendall(a + b + c)
        r = Reader(s)
        s1, _, b1 = r.response()
        s2, _, b2 = r.response()
        s3, _, b3 = r.response()
    assert (s1, s2, s3) == (200, 200, 200)
    assert json.loads(b1)["usage"]["completion_tokens"] == 3
    assert json.loads(b2)["usage"]["completion_tokens"] == 1
    assert json.loads(b3) == {"status": "ok"}


def test_routing_errors(server):
    status, _, body = roundtrip(server, request("GET", "/v1/nothing"))
    assert status == 404 and error_of(body)
    status, headers, body = roundtrip(server, request("GET", "/v1/completions"))
    assert status == 405 and "POST" in headers["allow"] and error_of(body)
    status, _, body = roundtrip(server, request("DELETE", "/health"))
    assert status == 405
    assert_alive(server)


def test_disconnect_cancels_generation(server):
    body = {"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
    s = connect(server)
    s.sendall(request("POST", "/v1/completions", body))
    data = b""
    while b"data: " not in data:
        data += s.recv(4096)
    s.close()
    # 400 tokens would take far longer than this on a CPU; the cancel frees the engine at once.
    t0 = time.time()
    wait_idle(server, timeout=10)
    assert time.time() - t0 < 10
    assert_alive(server)


def test_stream_error_chunk_format(server):
    # A streamed request whose submit is refused is a plain JSON error, not a broken stream.
    status, headers, body = roundtrip(server, request("POST", "/v1/completions",
                                                      {"model": "nope", "prompt": "x", "stream": True}))
    assert status == 404 and headers["content-type"].startswith("application/json") and error_of(body)


def test_garbage_bytes(server):
    with connect(server) as s:
        s.sendall(b"\x00\x01\x02 NOT HTTP\r\n\r\n")
        status, _, _ = Reader(s).response()
    assert status == 400
    assert_alive(server)
