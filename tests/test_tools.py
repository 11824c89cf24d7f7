"""Tool calling in the real chat templates (grpo.rollout.tools): render -> parse round trips for Qwen3 (hermes),
GPT-OSS (harmony) and ChatML without a tools section (the fallback), with the tiny tokenizers carrying those
templates; malformed calls stay text with the reason; argument checking against the function's schema."""

import json

import pytest

from grpo.models.loading import chat_tokenizer
from grpo.models.tiny_data import build_tokenizer
from grpo.rollout.tools import (
    continuation_text,
    openai_message,
    parse_assistant,
    render_messages,
    render_tool_prompt,
    template_family,
    tool_message,
    validate_arguments,
)

MULTIPLY = {"type": "function", "function": {
    "name": "multiply", "description": "Multiply two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"], "additionalProperties": False}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city"]}}}
TOOLS = [MULTIPLY, WEATHER]
Q = [{"role": "user", "content": "What is 12 * 34?"}]
CALL = {"id": "call_a", "type": "function", "function": {"name": "multiply", "arguments": '{"a": 12, "b": 34}'}}


@pytest.fixture(scope="module")
def toks():
    return {"qwen3": chat_tokenizer("qwen3"), "harmony": chat_tokenizer("gpt_oss"), "chatml_fallback": build_tokenizer()}


@pytest.mark.parametrize("family", ["qwen3", "harmony", "chatml_fallback"])
def test_family_and_the_tools_reach_the_prompt(toks, family, capsys):
    tok = toks[family]
    assert template_family(tok) == family
    prompt = render_tool_prompt(tok, Q, TOOLS)
    assert "multiply" in prompt and "get_weather" in prompt and "What is 12 * 34?" in prompt
    if family == "harmony":
        assert "namespace functions" in prompt and "type multiply = (_: {\n// " not in prompt
    else:  # hermes: the schemas as JSON lines inside <tools>
        assert json.dumps(MULTIPLY) in prompt and "<tool_call>" in prompt
    err = capsys.readouterr().err
    assert ("has no tools section" in err) == (family == "chatml_fallback")


def test_the_fallback_warns_once_per_model_and_keeps_the_records_system_message(toks, capsys):
    tok = build_tokenizer()
    tok.name_or_path = "some/chatml-model"
    msgs = [{"role": "system", "content": "Be brief."}, *Q]
    first = render_tool_prompt(tok, msgs, TOOLS)
    render_tool_prompt(tok, msgs, TOOLS)
    err = capsys.readouterr().err
    assert err.count("some/chatml-model") == 1
    assert first.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert render_tool_prompt(tok, msgs, None) == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("family", ["qwen3", "harmony", "chatml_fallback"])
def test_a_call_rendered_by_the_template_parses_back_to_the_same_message(toks, family):
    """The template writes an assistant turn with a tool call; what follows the generation prompt (the text a
    model would have sampled) parses back to the same name and arguments, with no parse error."""
    tok = toks[family]
    prompt = render_tool_prompt(tok, Q, TOOLS, reasoning_effort="high")
    msg = {"role": "assistant", "content": "", "reasoning_content": "I should multiply.", "tool_calls": [CALL]}
    full = render_messages(tok, Q + [msg], tools=TOOLS, add_generation_prompt=False, reasoning_effort="high")
    assert full.startswith(prompt)
    sampled = full[len(prompt):]
    # the decoded token ids give the same text (special tokens kept): what the rollout parses
    assert tok.decode(tok(sampled, add_special_tokens=False)["input_ids"], skip_special_tokens=False) == sampled
    got = parse_assistant(sampled, family, TOOLS)
    assert got["parse_error"] is None, got
    assert [c["function"]["name"] for c in got["tool_calls"]] == ["multiply"]
    assert json.loads(got["tool_calls"][0]["function"]["arguments"]) == {"a": 12, "b": 34}
    assert got["tool_calls"][0]["type"] == "function" and got["tool_calls"][0]["id"].startswith("call_")
    assert got["content"] == ""
    if family != "chatml_fallback":  # ChatML has no reasoning field: the model writes none
        assert got["reasoning_content"] == "I should multiply."
    assert openai_message(got) == {k: v for k, v in got.items() if k != "parse_error" and v is not None}


@pytest.mark.parametrize("family", ["qwen3", "harmony", "chatml_fallback"])
def test_tool_results_continue_in_the_templates_own_format(toks, family):
    tok = toks[family]
    msg = {"role": "assistant", "content": "", "tool_calls": [CALL]}
    glue = continuation_text(tok, Q + [msg], [tool_message(CALL, "408")], tools=TOOLS)
    whole = render_messages(tok, Q + [msg, tool_message(CALL, "408")], tools=TOOLS)
    assert whole.endswith(glue) and "408" in glue
    expected = {
        "qwen3": "\n<|im_start|>user\n<tool_response>\n408\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
                 "<think>\n\n</think>\n\n",
        "harmony": "<|start|>functions.multiply to=assistant<|channel|>commentary<|message|>\"408\"<|end|>"
                   "<|start|>assistant",
        "chatml_fallback": "\n<|im_start|>user\n<tool_response>\n408\n</tool_response><|im_end|>\n"
                           "<|im_start|>assistant\n",
    }[family]
    assert glue == expected


def test_qwen3_text_around_calls_and_several_calls(toks):
    text = ("<think>\nneed two tools\n</think>\n\nLet me check.\n<tool_call>\n{\"name\": \"multiply\", \"arguments\": "
            "{\"a\": 2, \"b\": 3}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": "
            "{\"city\": \"Paris\", \"unit\": \"c\"}}\n</tool_call><|im_end|>")
    got = parse_assistant(text, "qwen3", TOOLS)
    assert got["parse_error"] is None
    assert got["content"] == "Let me check." and got["reasoning_content"] == "need two tools"
    assert [c["function"]["name"] for c in got["tool_calls"]] == ["multiply", "get_weather"]
    assert len({c["id"] for c in got["tool_calls"]}) == 2


@pytest.mark.parametrize("body, reason", [
    ('{"name": "multiply", "arguments": {"a": 2, "b": }}', "not valid JSON"),
    ('{"name": "divide", "arguments": {"a": 2, "b": 3}}', "unknown function 'divide'"),
    ('{"name": "multiply", "arguments": {"a": 2}}', "missing required property 'b'"),
    ('{"name": "multiply", "arguments": {"a": "2", "b": 3}}', "arguments.a: expected integer, got string"),
    ('{"name": "multiply", "arguments": {"a": 2, "b": 3, "c": 4}}', "unexpected property 'c'"),
    ('{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "k"}}', "is not one of"),
    ('["multiply", 2, 3]', "not an object"),
])
def test_a_malformed_call_stays_text_with_its_reason(body, reason):
    text = f"Sure.\n<tool_call>\n{body}\n</tool_call><|im_end|>"
    got = parse_assistant(text, "qwen3", TOOLS)
    assert got["tool_calls"] == []
    assert reason in got["parse_error"]
    assert got["content"] == f"Sure.\n<tool_call>\n{body}\n</tool_call>"  # never dropped


def test_a_list_of_calls_in_one_block_as_smollm2_writes_them():
    text = ('<tool_call>[{"name": "multiply", "arguments": {"a": 2, "b": 3}}, '
            '{"name": "get_weather", "arguments": {"city": "Oslo"}}]</tool_call>')
    got = parse_assistant(text, "chatml_fallback", TOOLS)
    assert got["parse_error"] is None and got["content"] == ""
    assert [c["function"]["name"] for c in got["tool_calls"]] == ["multiply", "get_weather"]
    bad = parse_assistant('<tool_call>[{"name": "multiply", "arguments": {"a": 2}}]</tool_call>', "qwen3", TOOLS)
    assert bad["tool_calls"] == [] and "missing required property 'b'" in bad["parse_error"]


def test_one_good_and_one_bad_call_and_an_unterminated_call():
    text = ('<tool_call>\n{"name": "multiply", "arguments": {"a": 2, "b": 3}}\n</tool_call>\n'
            '<tool_call>\n{"name": "multiply", "arguments": {"a": 2, "b": 3}')
    got = parse_assistant(text, "qwen3", TOOLS)
    assert len(got["tool_calls"]) == 1 and "unterminated" in got["parse_error"]
    assert got["content"] == '<tool_call>\n{"name": "multiply", "arguments": {"a": 2, "b": 3}'


def test_harmony_calls_with_the_recipient_in_either_place_and_malformed_ones():
    a = ("<|channel|>analysis<|message|>multiply them<|end|><|start|>assistant<|channel|>commentary "
         "to=functions.multiply <|constrain|>json<|message|>{\"a\": 5, \"b\": 6}<|call|>")
    b = " to=functions.multiply<|channel|>commentary json<|message|>{\"a\": 5, \"b\": 6}<|call|>"
    for text in (a, b):
        got = parse_assistant(text, "harmony", TOOLS)
        assert got["parse_error"] is None and json.loads(got["tool_calls"][0]["function"]["arguments"]) == {"a": 5, "b": 6}
    bad = parse_assistant(" to=functions.multiply<|channel|>commentary json<|message|>{\"a\": 5<|call|>", "harmony", TOOLS)
    assert bad["tool_calls"] == [] and "not valid JSON" in bad["parse_error"] and '{"a": 5' in bad["content"]
    final = parse_assistant("<|channel|>analysis<|message|>hm<|end|><|start|>assistant<|channel|>final<|message|>"
                            "30<|return|>", "harmony", TOOLS)
    assert final == {"role": "assistant", "content": "30", "tool_calls": [], "reasoning_content": "hm",
                     "parse_error": None}


def test_without_tools_nothing_is_parsed_as_a_call():
    text = '<tool_call>\n{"name": "multiply", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>'
    got = parse_assistant(text, "qwen3", None)
    assert got["tool_calls"] == [] and got["parse_error"] is None and got["content"].startswith("<tool_call>")


def test_validate_arguments_on_the_schema_subset():
    schema = {"type": "object", "properties": {
        "xs": {"type": "array", "items": {"type": "number"}},
        "opt": {"type": ["string", "null"]},
        "nested": {"type": "object", "properties": {"k": {"type": "boolean"}}, "required": ["k"]},
        "choice": {"anyOf": [{"type": "integer"}, {"type": "string", "enum": ["x"]}]}},
        "additionalProperties": {"type": "string"}}
    assert validate_arguments({"xs": [1, 2.5], "opt": None, "nested": {"k": True}, "choice": "x", "z": "s"}, schema) is None
    assert validate_arguments({"xs": [1, "2"]}, schema) == "arguments.xs[1]: expected number, got string"
    assert validate_arguments({"nested": {}}, schema) == "arguments.nested: missing required property 'k'"
    assert validate_arguments({"nested": {"k": 1}}, schema) == "arguments.nested.k: expected boolean, got number"
    assert validate_arguments({"choice": "y"}, schema) == "arguments.choice: matches none of the anyOf schemas"
    assert validate_arguments({"z": 3}, schema) == "arguments.z: expected string, got number"
    assert validate_arguments({"a": True, "b": 1}, MULTIPLY["function"]["parameters"]) == \
        "arguments.a: expected integer, got boolean"
    assert validate_arguments([], None) is None
