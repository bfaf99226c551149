"""A small OpenAI-compatible test double: scripted replies and faults, every request recorded.

Rules are (substring, action) pairs matched against the request's text parts; the first match wins.
Actions: "500" (HTTP 500), "400", "timeout" (sleep past the client's timeout), "malformed" (200 with
a body that is not a chat completion), "garbage" (200, not JSON), "close" (drop the connection),
"drip" (a valid completion whose body trickles out at `drip_bytes_per_s`), "429" / "503" (optionally
"429:<Retry-After value>", e.g. "429:1" or an HTTP-date), or any other string: the reply text; or a list
of actions used one per matching request, the last one repeating (["429:1", "ok"]).
Without a match: "\\boxed{1}" for verify prompts, else `default_answer`.

Like vLLM, the server lists `models` on GET /models and answers a chat for any other model with vLLM's
404 body; with `api_key` set, a request without that bearer key gets vLLM's 401 {"error": "Unauthorized"}.
Used only for exact failure behaviour; end-to-end tests use the real transformers serve.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


# The model names the suite's configs and tests send (tiny_demo.yaml, the reference model, test names).
DEFAULT_MODELS = ("double", "m", "m1", "m2", "Qwen/Qwen3-VL-8B-Instruct", "tiny_models/qwen3-vl-tiny")


class DoubleServer:
    def __init__(self, rules=None, default_answer="\\boxed{A}", delay_s: float = 0.0, timeout_sleep_s: float = 5.0,
                 models=DEFAULT_MODELS, api_key=None, drip_bytes_per_s: float = 2.0):
        self.rules = [(needle, list(act) if isinstance(act, (list, tuple)) else [act]) for needle, act in rules or []]
        self.default_answer = default_answer
        self.delay_s = delay_s
        self.timeout_sleep_s = timeout_sleep_s
        self.models = list(models)
        self.api_key = api_key
        self.drip_bytes_per_s = drip_bytes_per_s
        self.requests: list[dict] = []
        self.model_lists = 0  # GET /models answered
        self.lock = threading.Lock()
        self._hits: dict[int, int] = {}
        self._stop = threading.Event()  # ends drip loops when the server stops
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

            def _refused(self) -> bool:
                if outer.api_key is None or self.headers.get("Authorization") == f"Bearer {outer.api_key}":
                    return False
                self._send(401, b'{"error": "Unauthorized"}')  # what vLLM --api-key answers
                return True

            def do_GET(self):
                if self._refused():
                    return
                if self.path.endswith("/models"):
                    with outer.lock:
                        outer.model_lists += 1
                    data = [{"id": m, "object": "model", "root": m} for m in outer.models]
                    return self._send(200, json.dumps({"object": "list", "data": data}).encode())
                if self.path.endswith("/health"):
                    return self._send(200, b"{}")
                self._send(404, b"{}")

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                if self._refused():
                    return
                with outer.lock:
                    outer.requests.append(body)
                texts = " ".join(part.get("text", "") for m in body.get("messages", [])
                                 for part in (m["content"] if isinstance(m["content"], list) else [{"text": m["content"]}]))
                if body.get("model") not in outer.models:  # vLLM's answer, body and all
                    return self._send(404, json.dumps({
                        "object": "error", "message": f"The model `{body.get('model')}` does not exist.",
                        "type": "NotFoundError", "param": None, "code": 404}).encode())
                with outer.lock:
                    action = outer._action(texts)
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
                if action.split(":", 1)[0] in ("429", "503"):
                    code, _, retry_after = action.partition(":")
                    self.send_response(int(code))
                    if retry_after:
                        self.send_header("Retry-After", retry_after)
                    msg = json.dumps({"error": {"message": f"injected {code}", "type": "overloaded"}}).encode()
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                if action == "drip":  # headers at once, then the body a byte at a time; ends when the client hangs up
                    payload = json.dumps(_completion("dripped")).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.flush()
                    for i in range(len(payload)):
                        if outer._stop.wait(1.0 / outer.drip_bytes_per_s):
                            return
                        self.wfile.write(payload[i:i + 1])
                        self.wfile.flush()
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

    def _action(self, text: str):
        """The action for a request, or None for the default (called under the lock: lists advance per hit)."""
        for k, (needle, actions) in enumerate(self.rules):
            if needle in text:
                hit = self._hits.get(k, 0)
                self._hits[k] = hit + 1
                return actions[min(hit, len(actions) - 1)]
        return None

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
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
