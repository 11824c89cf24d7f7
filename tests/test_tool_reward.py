"""Single-turn function calling as the grader sees it: sampled token ids with a tool call become the OpenAI
assistant message of the Lambda event (tool_calls, metadata.tool_call_parse_error for a malformed call), the
parse-error metric, and rewards/tool_call.py's scores (hand-computed partial credit), run by the real runner."""

import importlib.util
import json
import types
from pathlib import Path

import pytest

from grpo.batch import pack_step
from grpo.data import Record
from grpo.models.loading import chat_tokenizer
from grpo.reward.runner import RewardRunner
from grpo.rollout.multiturn import Conversation, attach_tool_calls
from grpo.training.metrics import Processes, tool_metrics
from grpo.training.validation import build_trajectories

HANDLER = Path(__file__).resolve().parents[1] / "rewards" / "tool_call.py"
spec = importlib.util.spec_from_file_location("tool_call", HANDLER)
tool_call = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool_call)

TOOLS = [{"type": "function", "function": {"name": "multiply", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}}]
REF = {"tool_calls": [{"name": "multiply", "arguments": {"a": 12, "b": 34}}]}


def _traj(calls, ref=REF, parse_error=None):
    msg = {"role": "assistant", "content": ""}
    if calls is not None:
        msg["tool_calls"] = [{"id": f"c{i}", "type": "function",
                              "function": {"name": n, "arguments": json.dumps(a)}} for i, (n, a) in enumerate(calls)]
    return {"id": "r#0", "messages": [{"role": "user", "content": "q"}, msg], "reference_answer": ref,
            "metadata": {"reference_answer": ref, "tool_call_parse_error": parse_error}}


@pytest.mark.parametrize("calls, ref, score", [
    ([("multiply", {"a": 12, "b": 34})], REF, 1.0),
    ([("multiply", {"b": 34.0, "a": 12})], REF, 1.0),  # JSON-normalised: 34.0 == 34, key order ignored
    ([("multiply", {"a": 12, "b": 35})], REF, 0.75),  # name 0.5 + 0.5 x 1 of 2 keys
    ([("multiply", {"a": 12, "b": 34, "c": 1})], REF, 0.5 + 0.5 * 2 / 3),  # an extra key counts against
    ([("add", {"a": 12, "b": 34})], REF, 0.0),
    (None, REF, 0.0),
    ([("multiply", {"a": 12, "b": 34}), ("add", {"a": 1, "b": 2})], REF, 0.5),  # an extra call costs its share
    ([("multiply", {"a": 12, "b": 34})], {"tool_calls": REF["tool_calls"] * 2}, 0.5),  # a missing call too
    (None, {"tool_calls": []}, 1.0),
    ([("add", {"a": 1, "b": 2})], {"tool_calls": []}, 0.0),
    ([("multiply", {"a": 12, "b": 34})], {"name": "multiply", "arguments": '{"a": 12, "b": 34}'}, 1.0),
])
def test_partial_credit_by_hand(calls, ref, score):
    out = tool_call.lambda_handler([_traj(calls, ref)], None)[0]
    assert out["aggregate_reward_score"] == pytest.approx(score)


def test_a_reference_without_calls_is_an_error_naming_the_trajectory():
    with pytest.raises(ValueError, match="trajectory 'r#0': reference_answer has no tool_calls"):
        tool_call.lambda_handler([_traj(None, {"text": "408"})], None)


def test_sampled_calls_reach_the_grader_as_tool_calls_and_malformed_ones_as_text_with_a_flag():
    tok = chat_tokenizer("qwen3")
    texts = ['<tool_call>\n{"name": "multiply", "arguments": {"a": 12, "b": 34}}\n</tool_call><|im_end|>',
             '<tool_call>\n{"name": "multiply", "arguments": {"a": 12}}\n</tool_call><|im_end|>',
             'It is 408.<|im_end|>']
    responses = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    prompt = tok("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    batch = pack_step([prompt] * 3, responses, tok.pad_token_id, group=[0, 0, 0], sample=[0, 1, 2],
                      truncated=[False] * 3, contents=["raw"] * 3, reasoning=[None] * 3)
    records = [Record(1, "r", [{"role": "user", "content": "What is 12 * 34?"}], REF, {"source": "x"}, TOOLS)]
    attach_tool_calls(batch, tok, [Conversation(records[0].messages, TOOLS)])
    events = build_trajectories(records, batch)
    good, bad, none = (e["messages"][-1] for e in events)
    assert good["tool_calls"][0]["function"] == {"name": "multiply", "arguments": '{"a": 12, "b": 34}'}
    assert good["content"] == "" and "tool_calls" not in bad and "tool_calls" not in none
    assert bad["content"] == '<tool_call>\n{"name": "multiply", "arguments": {"a": 12}}\n</tool_call>'
    assert [e["metadata"]["tool_call_parse_error"] for e in events] == [
        None, "multiply: arguments: missing required property 'b'", None]
    assert events[0]["metadata"]["source"] == "x"
    m = tool_metrics(batch, Processes(types.SimpleNamespace(num_processes=1)))
    assert m == {"response_tool_call_parse_error_ratio": pytest.approx(1 / 3), "tools_call_ratio": pytest.approx(1 / 3),
                 "tools_calls_mean": pytest.approx(1 / 3)}
    with RewardRunner(str(HANDLER), max_concurrency=1) as runner:
        result = runner.score(events)
    assert result.scores == [1.0, 0.0, 0.0]
    assert result.metrics["parse_error"] == [0.0, 1.0, 0.0]


def test_without_tools_the_event_is_what_it_always_was():
    tok = chat_tokenizer("qwen3")
    resp = tok("#### 5<|im_end|>", add_special_tokens=False)["input_ids"]
    batch = pack_step([[1, 2]], [resp], tok.pad_token_id, group=[0], sample=[0], truncated=[False],
                      contents=["#### 5"], reasoning=[None])
    records = [Record(1, "r", [{"role": "user", "content": "q"}], "#### 5", {})]
    attach_tool_calls(batch, tok, [Conversation(records[0].messages, None)])
    assert batch.messages is None
    assert build_trajectories(records, batch) == [{
        "id": "r#0", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "#### 5"}],
        "reference_answer": {"text": "#### 5"}, "metadata": {"reference_answer": "#### 5"}}]
