"""Test handler: raises on a trajectory whose response says 'boom', after printing a line."""


def check(t):
    if t["messages"][-1]["content"] == "boom":
        raise ValueError(f"cannot grade trajectory {t['id']}: reference is unreadable")
    return {"id": t["id"], "aggregate_reward_score": 1.0}


def lambda_handler(event, context):
    print("grading", len(event), "trajectories")
    return [check(t) for t in event]
