"""Test handler: dereferences a NULL pointer (SIGSEGV) when a response says 'segv'."""
import ctypes


def lambda_handler(event, context):
    if any(t["messages"][-1]["content"] == "segv" for t in event):
        ctypes.string_at(0)
    return [{"id": t["id"], "aggregate_reward_score": 1.0} for t in event]
