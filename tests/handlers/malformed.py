"""Test handler: answers wrongly in the way the first trajectory's metadata.mode names."""


def lambda_handler(event, context):
    mode = event[0]["metadata"].get("mode", "ok")
    good = [{"id": t["id"], "aggregate_reward_score": 1.0,
             "metrics_list": [{"name": "m", "value": 1.0, "type": "Metric"}]} for t in event]
    if mode == "short":
        return good[:-1]
    if mode == "wrong_ids":
        return [dict(e, id=e["id"] + "x") for e in good]
    if mode == "reversed":
        return good[::-1]
    if mode == "nan":
        good[0]["aggregate_reward_score"] = float("nan")
        return good
    if mode == "bool":
        good[0]["aggregate_reward_score"] = True
        return good
    if mode == "string_score":
        good[0]["aggregate_reward_score"] = "1.0"
        return good
    if mode == "bad_metric_type":
        good[0]["metrics_list"] = [{"name": "m", "value": 1.0, "type": "Score"}]
        return good
    if mode == "bad_metric_value":
        good[0]["metrics_list"] = [{"name": "m", "value": float("inf"), "type": "Metric"}]
        return good
    if mode == "metrics_not_list":
        good[0]["metrics_list"] = {"name": "m", "value": 1.0, "type": "Metric"}
        return good
    if mode == "dict":
        return {"statusCode": 200, "body": good}
    if mode == "huge":
        return [dict(e, note="x" * 5000) for e in good]
    if mode == "sys_exit":
        import sys

        sys.exit(3)
    if mode == "not_serializable":
        return [{"id": t["id"], "aggregate_reward_score": {1.0}} for t in event]
    return good
