"""Test handler: records each import (pid) and each call's context to the file named by PROBE_FILE."""
import json
import os

with open(os.environ["PROBE_FILE"], "a") as _f:
    _f.write(json.dumps({"import": os.getpid()}) + "\n")


def lambda_handler(event, context):
    info = {
        "pid": os.getpid(),
        "function_name": context.function_name,
        "function_version": context.function_version,
        "invoked_function_arn": context.invoked_function_arn,
        "memory_limit_in_mb": context.memory_limit_in_mb,
        "aws_request_id": context.aws_request_id,
        "log_group_name": context.log_group_name,
        "log_stream_name": context.log_stream_name,
        "remaining_ms": context.get_remaining_time_in_millis(),
        "n": len(event),
        "event": event,
    }
    with open(os.environ["PROBE_FILE"], "a") as f:
        f.write(json.dumps(info) + "\n")
    return [{"id": t["id"], "aggregate_reward_score": 1.0} for t in event]
