"""Invoking a deployed reward Lambda by ARN with boto3, with our own retry policy.

botocore's retries are switched off (``total_max_attempts=1``) so that one documented policy applies:
throttling (HTTP 429 / ``TooManyRequestsException``) and transient errors (HTTP 5xx, connection
errors: botocore's ``ConnectionError`` family, which holds connect timeouts and proxy errors, and a
connection closed mid-answer) are retried up to ``max_retries`` times with exponential backoff and full
jitter (``sleep = uniform(0, min(retry_max_s, retry_base_s * 2**attempt))``); anything else (403, 404,
a 4xx validation error, a TLS certificate error) fails at once. A malformed endpoint URL or region is
a UserError when the client is made. A ``FunctionError`` answer is the handler's own failure and is
reported with its payload's ``errorType``, ``errorMessage`` and ``stackTrace``; it is not retried
(the handler would fail the same way). boto3 is imported only when an ARN is used.
"""

from __future__ import annotations

import json
import random
import re
import threading
from dataclasses import dataclass

from grpo.errors import UserError
from grpo.reward.workers import CallOutcome, format_lambda_error

ARN_RE = re.compile(
    r"arn:(aws[a-zA-Z-]*):lambda:([a-z]{2}(?:-[a-z]+)+-\d+):(\d{12}):function:([A-Za-z0-9_-]{1,64})"
    r"(?::(\$LATEST|[A-Za-z0-9_-]{1,128}))?"
)
RETRYABLE_CODES = {
    "TooManyRequestsException", "ThrottlingException", "Throttling", "ServiceException",
    "ResourceNotReadyException", "EC2ThrottledException", "ENILimitReachedException",
    "SubnetIPAddressLimitReachedException", "RequestTimeoutException", "ServiceUnavailable",
}


@dataclass(frozen=True)
class LambdaArn:
    arn: str
    region: str
    account: str
    name: str
    qualifier: str | None


def parse_arn(text: str) -> LambdaArn:
    """``arn:aws:lambda:REGION:ACCOUNT:function:NAME[:QUALIFIER]`` or a UserError saying what is wrong."""
    m = ARN_RE.fullmatch(text.strip())
    if not m:
        raise UserError(
            f"handler {text!r} is not a Lambda function ARN; expected "
            "arn:aws:lambda:REGION:ACCOUNT:function:NAME[:QUALIFIER] (ACCOUNT is 12 digits)")
    return LambdaArn(text.strip(), m.group(2), m.group(3), m.group(4), m.group(5))


class LambdaInvoker:
    """Calls one Lambda synchronously; thread-safe (one botocore client shared by the caller's threads)."""

    def __init__(self, arn: LambdaArn, *, region: str | None = None, endpoint_url: str | None = None,
                 timeout_s: float = 300.0, max_retries: int = 8, retry_base_s: float = 0.25,
                 retry_max_s: float = 20.0, max_pool_connections: int = 10, connect_timeout_s: float = 10.0):
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError

        self.arn, self.max_retries = arn, max_retries
        self.retry_base_s, self.retry_max_s = retry_base_s, retry_max_s
        config = Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            read_timeout=timeout_s + 10, connect_timeout=connect_timeout_s,
            max_pool_connections=max(10, max_pool_connections),
        )
        region = region or arn.region
        try:
            self.client = boto3.session.Session().client(
                "lambda", region_name=region, endpoint_url=endpoint_url, config=config)
        except (ValueError, BotoCoreError) as exc:  # "Invalid endpoint: ...", InvalidRegionError, ...
            raise UserError(f"cannot make a Lambda client for {arn.arn} (region {region!r}, endpoint "
                            f"{endpoint_url or 'the default'}): {exc}") from None
        self.timeout_s = timeout_s
        self._closed = threading.Event()  # wakes retry back-offs when the runner closes

    def _backoff(self, attempt: int) -> float:
        return random.uniform(0.0, min(self.retry_max_s, self.retry_base_s * 2 ** attempt))

    def call(self, payload: bytes) -> CallOutcome:
        from botocore.exceptions import BotoCoreError, ClientError, ConnectionClosedError, ReadTimeoutError, SSLError
        from botocore.exceptions import ConnectionError as BotoConnectionError

        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt and self._closed.wait(self._backoff(attempt - 1)):
                return CallOutcome(kind="invoke", message=f"the reward runner was closed while retrying "
                                                          f"{self.arn.arn}; last: {last}")
            try:
                resp = self.client.invoke(FunctionName=self.arn.arn, InvocationType="RequestResponse",
                                          Payload=payload)
            except ClientError as exc:
                err = exc.response.get("Error", {})
                status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
                last = f"{err.get('Code', 'Error')} (HTTP {status}): {err.get('Message', '')}"
                if status == 429 or status >= 500 or err.get("Code") in RETRYABLE_CODES:
                    continue
                return CallOutcome(kind="invoke", message=f"invoking {self.arn.arn} failed: {last}")
            except ReadTimeoutError:
                return CallOutcome(kind="timeout", message=(
                    f"no answer from {self.arn.arn} within {self.timeout_s + 10:g} s (read timeout)"))
            except SSLError as exc:  # a certificate or TLS setup problem: trying again will not fix it
                return CallOutcome(kind="invoke", message=f"invoking {self.arn.arn} failed: "
                                                          f"{type(exc).__name__}: {exc}")
            except (BotoConnectionError, ConnectionClosedError) as exc:  # refused, connect timeout, proxy, reset
                last = f"{type(exc).__name__}: {exc}"
                continue
            except BotoCoreError as exc:  # credentials, parameter validation, ...: not transient
                return CallOutcome(kind="invoke", message=f"invoking {self.arn.arn} failed: "
                                                          f"{type(exc).__name__}: {exc}")
            body = resp["Payload"].read()
            if resp.get("FunctionError"):
                try:
                    err = json.loads(body)
                    message = format_lambda_error(err) if isinstance(err, dict) else repr(err)
                except ValueError:
                    message = body.decode("utf-8", "replace")[:2000]
                return CallOutcome(kind="error", message=f"FunctionError ({resp['FunctionError']}): {message}")
            return CallOutcome(answer=body)
        return CallOutcome(kind="invoke", message=(
            f"invoking {self.arn.arn} failed after {self.max_retries + 1} tries (throttled or transient "
            f"errors, exponential backoff); last: {last}"))

    def close(self) -> None:
        self._closed.set()
        self.client.close()
