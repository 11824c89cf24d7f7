"""A small Lambda Invoke API emulator on loopback, for testing the ARN path with the real boto3 client.

``POST /2015-03-31/functions/{name}/invocations`` runs a local handler (a callable, or a file path
whose ``lambda_handler`` is imported) in the server's thread and answers like Lambda does:
200 + the JSON answer; a handler exception gives 200 with ``X-Amz-Function-Error: Unhandled`` and the
``{"errorMessage", "errorType", "stackTrace"}`` payload. It can be told to answer the first N calls
with 429 ``TooManyRequestsException`` (``throttle_first``) or 500 ``ServiceException``
(``fail_first``), and to refuse bodies over ``max_payload`` bytes with 413
``RequestEntityTooLargeException``. ``calls`` records (function name, body size, status) per request.
"""

from __future__ import annotations

import importlib.util
import json
import threading
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote


def _load(path: str):
    spec = importlib.util.spec_from_file_location(f"emulated_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.lambda_handler


class LambdaEmulator:
    def __init__(self, handler, *, throttle_first: int = 0, fail_first: int = 0, max_payload: int | None = None):
        self.handler = _load(handler) if isinstance(handler, (str, Path)) else handler
        self.throttle_first, self.fail_first, self.max_payload = throttle_first, fail_first, max_payload
        self.calls: list[tuple[str, int, int]] = []
        self._lock = threading.Lock()
        emulator = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                emulator._serve(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LambdaEmulator:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _reply(self, req, status: int, body: dict | list, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        req.send_response(status)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(data)))
        req.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        for k, v in (headers or {}).items():
            req.send_header(k, v)
        req.end_headers()
        req.wfile.write(data)

    def _serve(self, req) -> None:
        parts = req.path.split("?")[0].strip("/").split("/")
        body = req.rfile.read(int(req.headers.get("Content-Length", 0)))
        if len(parts) != 4 or parts[:2] != ["2015-03-31", "functions"] or parts[3] != "invocations":
            return self._reply(req, 404, {"Type": "User", "message": f"no route {req.path}"},
                               {"x-amzn-ErrorType": "ResourceNotFoundException"})
        name = unquote(parts[2])
        with self._lock:
            n = len(self.calls)
            status = 200
            if n < self.throttle_first:
                status = 429
            elif n < self.throttle_first + self.fail_first:
                status = 500
            elif self.max_payload is not None and len(body) > self.max_payload:
                status = 413
            self.calls.append((name, len(body), status))
        if status == 429:
            return self._reply(req, 429, {"Type": "User", "message": "Rate Exceeded.",
                                          "Reason": "ReservedFunctionConcurrentInvocationLimitExceeded"},
                               {"x-amzn-ErrorType": "TooManyRequestsException"})
        if status == 500:
            return self._reply(req, 500, {"Type": "Service", "message": "internal error"},
                               {"x-amzn-ErrorType": "ServiceException"})
        if status == 413:
            return self._reply(req, 413, {"Type": "User", "message": f"{len(body)} byte payload is too large"},
                               {"x-amzn-ErrorType": "RequestEntityTooLargeException"})
        context = SimpleNamespace(
            function_name=name.split(":")[6] if name.startswith("arn:") else name,
            function_version="$LATEST", invoked_function_arn=name, memory_limit_in_mb="512",
            aws_request_id=str(uuid.uuid4()), log_group_name="/aws/lambda/emulated",
            log_stream_name="emulated", get_remaining_time_in_millis=lambda: 300000)
        try:
            answer = self.handler(json.loads(body), context)
        except Exception as exc:  # noqa: BLE001 - reported the way Lambda reports it
            trace = traceback.format_tb(exc.__traceback__)[1:]
            return self._reply(req, 200, {"errorMessage": str(exc), "errorType": type(exc).__name__,
                                          "requestId": "", "stackTrace": trace},
                               {"X-Amz-Function-Error": "Unhandled", "X-Amz-Executed-Version": "$LATEST"})
        self._reply(req, 200, answer, {"X-Amz-Executed-Version": "$LATEST"})
