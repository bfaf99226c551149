"""A scriptable OpenAI-compatible test double for the RL judge: scripted replies and faults, every
request recorded.

Rules are (substring, action) pairs matched against the request's text parts; the first match wins.
An action is one of
  "500" (HTTP 500), "400" (HTTP 400), "timeout" (answer only after `timeout_sleep_s`), "malformed"
  (200, a completion without choices), "garbage" (200, not JSON), "close" (drop the connection),
  "hash01" ("1" or "0" from a hash of the request's messages: deterministic per image, varied across
  images), or any other string: the reply text;
or a list of actions used one per matching request, the last one repeating (["500", "1"]: fail once,
then answer "1"). Without a match the reply is `default_answer`.
Used for exact failure behaviour only; the end-to-end test uses the real transformers serve.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def completion(text: str) -> dict:
    """A minimal, valid chat.completion body."""
    return {"id": "chatcmpl-double", "object": "chat.completion", "created": 0, "model": "double",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def request_text(body: dict) -> str:
    """All text parts of a chat request, joined (what the rules match against)."""
    parts = []
    for m in body.get("messages", []):
        content = m.get("content")
        if isinstance(content, str):
            parts.append(content)
        else:
            parts += [p.get("text", "") for p in content or [] if isinstance(p, dict)]
    return " ".join(parts)


class DoubleServer:
    def __init__(self, rules=None, default_answer: str = "1", delay_s: float = 0.0, timeout_sleep_s: float = 3.0):
        self.rules = [(needle, list(act) if isinstance(act, (list, tuple)) else [act]) for needle, act in rules or []]
        self.default_answer = default_answer
        self.delay_s = delay_s
        self.timeout_sleep_s = timeout_sleep_s
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0  # the most requests the server held at once (concurrency limit tests)
        self._hits: dict[int, int] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path.endswith("/models"):
                    data = {"object": "list", "data": [{"id": "double", "object": "model"}]}
                    return self._send(200, json.dumps(data).encode())
                if self.path.endswith("/health"):
                    return self._send(200, b"{}")
                self._send(404, b"{}")

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                body["_authorization"] = self.headers.get("Authorization", "")
                with outer.lock:
                    outer.requests.append(body)
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                    action = outer._action(request_text(body))
                    if action == "hash01":  # a verdict fixed by the request content (its images)
                        digest = hashlib.sha256(json.dumps(body.get("messages"), sort_keys=True).encode()).digest()
                        action = str(digest[0] & 1)
                try:
                    self._respond(action)
                finally:
                    with outer.lock:
                        outer.in_flight -= 1

            def _respond(self, action: str) -> None:
                if outer.delay_s:
                    time.sleep(outer.delay_s)
                if action == "500":
                    return self._send(500, b'{"error": {"message": "injected server error"}}')
                if action == "400":
                    return self._send(400, b'{"error": {"message": "injected bad request"}}')
                if action == "timeout":
                    time.sleep(outer.timeout_sleep_s)
                    return self._send(200, json.dumps(completion("late")).encode())
                if action == "malformed":
                    return self._send(200, json.dumps({"id": "x", "object": "chat.completion", "choices": []}).encode())
                if action == "garbage":
                    return self._send(200, b"<html>not json</html>", ctype="text/html")
                if action == "close":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self._send(200, json.dumps(completion(action)).encode())

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # clients that gave up (timeouts): not news
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def _action(self, text: str) -> str:
        """The action for a request (called under the lock: list actions advance per hit)."""
        for k, (needle, actions) in enumerate(self.rules):
            if needle in text:
                hit = self._hits.get(k, 0)
                self._hits[k] = hit + 1
                return actions[min(hit, len(actions) - 1)]
        return self.default_answer

    def __enter__(self) -> "DoubleServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
