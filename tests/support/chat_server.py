"""A local HTTP server on 127.0.0.1 that speaks OpenAI's chat-completions protocol and
answers from a script, for tests of the LLM proposer through the real `openai` client.

Each request takes the next entry of the script (the last one repeats when it runs out):

    {"text": "..."}                      a reply (streamed as SSE when the request asks to stream)
    {"status": 429} / {"status": 500}    an HTTP error with an OpenAI-style error body
    {"truncated": "..."}                 half of the reply streamed, then the connection dropped
    {"delay": 5, "text": "..."}          the reply after a pause (longer than the client waits)
    {"text": ""}                         an empty reply

Every request is recorded (path, headers, body) for the test to inspect.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ChatServer:
    def __init__(self, script: list[dict]):
        self.script = list(script)
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with server._lock:
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    entry = server.script.pop(0) if len(server.script) > 1 else server.script[0]
                if not self.path.endswith("/chat/completions"):
                    return self._error(404, "not found")
                if "delay" in entry:
                    time.sleep(entry["delay"])
                if "status" in entry:
                    return self._error(entry["status"], f"scripted {entry['status']}")
                text = entry.get("text", entry.get("truncated", ""))
                if body.get("stream"):
                    return self._stream(body, text, truncated="truncated" in entry)
                self._json(200, {"id": "x", "object": "chat.completion", "created": 0,
                                 "model": body.get("model", "m"),
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": text}}],
                                 "usage": {"prompt_tokens": 100, "completion_tokens": len(text) // 4,
                                           "total_tokens": 100 + len(text) // 4}})

            def _json(self, code, payload):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _error(self, code, message):
                self._json(code, {"error": {"message": message, "type": "scripted", "code": code}})

            def _stream(self, body, text, truncated):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                pieces = [text[i:i + 40] for i in range(0, len(text), 40)] or [""]
                if truncated:
                    pieces = pieces[:max(1, len(pieces) // 2)]
                for piece in pieces:
                    self._event({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                                 "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
                if truncated:  # the connection drops mid-stream
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    self.close_connection = True
                    return
                self._event({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                             "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                if (body.get("stream_options") or {}).get("include_usage"):
                    self._event({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m",
                                 "choices": [], "usage": {"prompt_tokens": 100,
                                                          "completion_tokens": max(1, len(text) // 4),
                                                          "total_tokens": 100 + max(1, len(text) // 4)}})
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                self.close_connection = True

            def _event(self, payload):
                self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
                self.wfile.flush()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> ChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
