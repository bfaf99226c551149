"""A small OpenAI-compatible test double: scripted replies and faults, every request recorded.

Rules are (substring, action) pairs matched against the request's text parts; the first match wins.
Actions: "500" (HTTP 500), "400", "timeout" (sleep past the client's timeout), "malformed" (200 with
a body that is not a chat completion), "garbage" (200, not JSON), "close" (drop the connection), or any
other string: the reply text. Without a match: "\\boxed{1}" for verify prompts, else `default_answer`.
Used only for exact failure behaviour; end-to-end tests use the real transformers serve.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class DoubleServer:
    def __init__(self, rules=None, default_answer="\\boxed{A}", delay_s: float = 0.0, timeout_sleep_s: float = 5.0):
        self.rules = list(rules or [])
        self.default_answer = default_answer
        self.delay_s = delay_s
        self.timeout_sleep_s = timeout_sleep_s
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _send(self, code, body: bytes, ctype="application/json"):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path.endswith("/models"):
                    return self._send(200, json.dumps({"object": "list", "data": [{"id": "double", "object": "model"}]}).encode())
                if self.path.endswith("/health"):
                    return self._send(200, b"{}")
                self._send(404, b"{}")

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with outer.lock:
                    outer.requests.append(body)
                texts = " ".join(part.get("text", "") for m in body.get("messages", [])
                                 for part in (m["content"] if isinstance(m["content"], list) else [{"text": m["content"]}]))
                action = None
                for needle, act in outer.rules:
                    if needle in texts:
                        action = act
                        break
                if outer.delay_s:
                    time.sleep(outer.delay_s)
                if action is None:
                    action = "\\boxed{1}" if "judge" in texts else outer.default_answer
                if action == "500":
                    return self._send(500, b'{"error": {"message": "injected server error"}}')
                if action == "400":
                    return self._send(400, b'{"error": {"message": "injected bad request"}}')
                if action == "timeout":
                    time.sleep(outer.timeout_sleep_s)
                    return self._send(200, json.dumps(_completion("late")).encode())
                if action == "malformed":
                    return self._send(200, json.dumps({"id": "x", "object": "chat.completion", "choices": []}).encode())
                if action == "garbage":
                    return self._send(200, b"<html>not json</html>", ctype="text/html")
                if action == "close":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self._send(200, json.dumps(_completion(action)).encode())

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # clients that gave up (timeouts): not news
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _completion(text: str) -> dict:
    return {"id": "chatcmpl-double", "object": "chat.completion", "created": 0, "model": "double",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


if __name__ == "__main__":  # run standalone for subprocess tests: python double_server.py PORTFILE RULES_JSON
    import sys

    rules = json.loads(sys.argv[2]) if len(sys.argv) > 2 else []
    delay = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    with DoubleServer(rules, delay_s=delay) as srv:
        with open(sys.argv[1], "w") as f:
            f.write(str(srv.port))
        while True:
            time.sleep(1)
