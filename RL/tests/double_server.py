"""A scriptable OpenAI-compatible test double for the RL judge: scripted replies and faults, every
request recorded.

Rules are (substring, action) pairs matched against the request's text parts; the first match wins.
An action is one of
  "500" (HTTP 500), "400" (HTTP 400), "timeout" (answer only after `timeout_sleep_s`), "malformed"
  (200, a completion without choices), "garbage" (200, not JSON), "close" (drop the connection),
  "drip" (a valid completion whose body trickles out at `drip_bytes_per_s`), "429" / "503" (optionally
  "429:<Retry-After value>", e.g. "429:1" or an HTTP-date),
  "hash01" ("1" or "0" from a hash of the request's messages: deterministic per image, varied across
  images), or any other string: the reply text;
or a list of actions used one per matching request, the last one repeating (["500", "1"]: fail once,
then answer "1"). Without a match the reply is `default_answer`.
Like vLLM, the server lists `models` on GET /models and answers a chat for any other model with vLLM's
404 body; with `api_key` set, a request without that bearer key gets vLLM's 401 {"error": "Unauthorized"}.
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


# The model names the suite's configs and tests send (configs/rl tiny, the reference judge, test names).
DEFAULT_MODELS = ("double", "m", "Qwen/Qwen3-VL-8B-Instruct", "tiny_models/qwen3-vl-tiny")


class DoubleServer:
    def __init__(self, rules=None, default_answer: str = "1", delay_s: float = 0.0, timeout_sleep_s: float = 3.0,
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
        self._stop = threading.Event()  # ends drip loops when the server stops
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
                    data = {"object": "list", "data": [{"id": m, "object": "model", "root": m} for m in outer.models]}
                    return self._send(200, json.dumps(data).encode())
                if self.path.endswith("/health"):
                    return self._send(200, b"{}")
                self._send(404, b"{}")

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                body["_authorization"] = self.headers.get("Authorization", "")
                if self._refused():
                    return
                if body.get("model") not in outer.models:  # vLLM's answer, body and all
                    with outer.lock:
                        outer.requests.append(body)
                    return self._send(404, json.dumps({
                        "object": "error", "message": f"The model `{body.get('model')}` does not exist.",
                        "type": "NotFoundError", "param": None, "code": 404}).encode())
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
                if action.split(":", 1)[0] in ("429", "503"):
                    code, _, retry_after = action.partition(":")
                    msg = json.dumps({"error": {"message": f"injected {code}", "type": "overloaded"}}).encode()
                    self.send_response(int(code))
                    if retry_after:
                        self.send_header("Retry-After", retry_after)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                if action == "drip":  # headers at once, then the body a byte at a time; ends when the client hangs up
                    payload = json.dumps(completion("dripped")).encode()
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
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
