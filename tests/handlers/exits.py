"""Test handler: kills its interpreter with os._exit(1) when a response says 'exit'."""
import os


def lambda_handler(event, context):
    if any(t["messages"][-1]["content"] == "exit" for t in event):
        print("about to call os._exit(1)")
        os._exit(1)
    return [{"id": t["id"], "aggregate_reward_score": 1.0} for t in event]
