"""Tool calling through the inference API, driven by the real `openai` SDK against a real `grpo serve` on loopback
(tiny random Qwen3 and GPT-OSS with their real chat templates): `tools` and `tool_choice` on
/v1/chat/completions and /v1/responses, calls returned and streamed as the SDK's accumulators read them, history
with tool calls and results, 400s naming the field. A random model calls a tool only when forced: `required` and
named choices go through the llguidance grammar (grpo.rollout.constrain), so every such call must parse and match
its schema. Also: the same constraint in rollouts (`engine.rollout.tool_choice`), the stream holding back a call
the model writes on its own (a recorded generation), and the clear error when llguidance is missing."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from server_helpers import sse_data, start_server

pytest.importorskip("llguidance")

KEY = "test-key-tools-0123"
QWEN, GPT = "qwen.qwen3-32b", "openai.gpt-oss-20b"
PARAMS = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                                           "days": {"type": "integer", "minimum": 1, "maximum": 9}},
          "required": ["city", "days"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast", "parameters": PARAMS,
                                            "strict": True}}
CLOCK = {"type": "function", "function": {"name": "clock", "parameters": {"type": "object", "properties": {},
                                                                          "additionalProperties": False}, "strict": True}}
TOOLS = [WEATHER, CLOCK]
FLAT = [{"type": "function", **t["function"]} for t in TOOLS]  # the responses API's form
ASK = [{"role": "user", "content": "Weather in Paris for 3 days?"}]


def valid_call(name: str, arguments: str) -> dict:
    from grpo.rollout.tools import validate_arguments

    args = json.loads(arguments)
    schema = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[name]
    assert isinstance(args, dict) and validate_arguments(args, schema) is None, (name, arguments)
    return args


def _tiny(kind: str, seed: int = 0):
    import torch

    from grpo.models.loading import chat_tokenizer
    from grpo.models.tiny import build_random_gpt_oss, build_random_qwen3

    tok = chat_tokenizer(kind)
    torch.manual_seed(seed)
    return tok, (build_random_gpt_oss if kind == "gpt_oss" else build_random_qwen3)(tok)


@pytest.fixture
def one_thread():
    """Decoding a tiny model: one torch thread (two contend with themselves on a busy 2-core machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("tools_api")
    args = []
    for kind, bedrock_id in (("qwen3", QWEN), ("gpt_oss", GPT)):
        tok, model = _tiny(kind)
        model.save_pretrained(d / kind)
        tok.save_pretrained(d / kind)
        args += ["--model", f"{bedrock_id}={d / kind}"]
    (d / "handlers").mkdir()
    with start_server(d / "state", d / "handlers", KEY, args) as (url, key, _):
        yield (openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120),
               httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120))


def test_named_and_required_chat_calls_match_their_schema(served):
    from openai.types.chat import ChatCompletion

    client, http = served
    named = client.chat.completions.create(model=QWEN, messages=ASK, tools=TOOLS, max_tokens=200, n=2, seed=1,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert len(named.choices) == 2
    for c in named.choices:  # two samples of a random model: each one a call of get_weather, schema-valid
        assert c.finish_reason == "tool_calls" and c.message.content is None, c
        (call,) = c.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
        valid_call("get_weather", call.function.arguments)
    # required, on GPT-OSS's harmony format, strictly validated against the SDK's type
    raw = http.post("/chat/completions", json={"model": GPT, "messages": ASK, "tools": TOOLS, "tool_choice": "required",
                                               "max_tokens": 120, "seed": 2}).json()
    c = ChatCompletion.model_validate(raw).choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls, raw
    for call in c.message.tool_calls:
        valid_call(call.function.name, call.function.arguments)


def test_chat_stream_through_the_sdk_accumulator(served):
    from openai.types.chat import ChatCompletionChunk

    client, http = served
    with client.chat.completions.stream(model=QWEN, messages=ASK, tools=TOOLS, tool_choice="required",
                                        max_tokens=200, seed=3) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_completion()
    msg = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls" and "tool_calls.function.arguments.done" in kinds
    for call in msg.tool_calls:  # strict tools: the SDK parsed the arguments itself
        assert call.function.parsed_arguments == valid_call(call.function.name, call.function.arguments)
    body = {"model": QWEN, "messages": ASK, "tools": TOOLS, "max_tokens": 200, "seed": 3, "stream": True,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    chunks = [ChatCompletionChunk.model_validate(c) for c in sse_data(http.post("/chat/completions", json=body).text)]
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == "get_weather"
    valid_call("get_weather", "".join(d.function.arguments or "" for d in deltas))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks)  # the call text is not streamed as content


def test_responses_function_calls_and_their_stream(served):
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    client, http = served
    for model in (GPT, QWEN):
        r = client.responses.create(model=model, input=ASK[0]["content"], tools=FLAT, max_output_tokens=200,
                                    tool_choice={"type": "function", "name": "get_weather"})
        assert r.status == "completed" and r.tool_choice.name == "get_weather" and r.tools[0].name == "get_weather"
        (item,) = [o for o in r.output if o.type == "function_call"]
        assert item.name == "get_weather" and item.call_id.startswith("call_") and item.status == "completed"
        valid_call("get_weather", item.arguments)
    with client.responses.stream(model=GPT, input=ASK[0]["content"], tools=FLAT, tool_choice="required",
                                 max_output_tokens=120) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    calls = [o for o in final.output if o.type == "function_call"]
    assert calls and "response.function_call_arguments.done" in kinds and kinds[-1] == "response.completed"
    valid_call(calls[0].name, calls[0].arguments)
    body = {"model": GPT, "input": "hi", "tools": FLAT, "tool_choice": "required", "max_output_tokens": 120}
    Response.model_validate(http.post("/responses", json=body).json())
    events = sse_data(http.post("/responses", json={**body, "stream": True}).text)
    adapter = TypeAdapter(ResponseStreamEvent)
    assert all(adapter.validate_python(e) for e in events)


def test_history_with_calls_and_results(served):
    """A conversation carrying a call and its result is rendered by the template (the result inside
    `<tool_response>` for Qwen3, a `functions.NAME to=assistant` message for harmony) and answered; chat's
    messages and the responses API's function_call / function_call_output items make the same prompt."""
    from grpo.api.chat import chat_messages, response_messages
    from grpo.models.loading import chat_tokenizer
    from grpo.rollout.prompts import encode_prompt

    client, _ = served
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 2}'}}
    chat = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "Snow, -3 C"}]
    items = [{"type": "message", "role": "user", "content": ASK[0]["content"]},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": call["function"]["arguments"]},
             {"type": "function_call_output", "call_id": "call_1", "output": "Snow, -3 C"}]
    for kind, model, shown in (("qwen3", QWEN, "<tool_response>\nSnow, -3 C\n</tool_response>"),
                               ("gpt_oss", GPT, "functions.get_weather to=assistant")):
        tok = chat_tokenizer(kind)
        ids = encode_prompt(tok, chat_messages(chat), tools=TOOLS)
        assert ids == encode_prompt(tok, response_messages({"input": items}), tools=TOOLS)
        assert shown in tok.decode(ids) and "Snow, -3 C" in tok.decode(ids)
        c = client.chat.completions.create(model=model, messages=chat, tools=TOOLS, tool_choice="none", max_tokens=4)
        assert c.choices[0].message.tool_calls is None and c.usage.prompt_tokens == len(
            encode_prompt(tok, chat_messages(chat)))  # tool_choice none: the tools are not rendered
        r = client.responses.create(model=model, input=items, tools=FLAT, max_output_tokens=4)
        assert r.usage.input_tokens == len(ids)


def test_unsupported_tool_options_are_400s_naming_them(served):
    _, http = served
    chat = {"model": QWEN, "messages": ASK, "max_tokens": 2}
    resp = {"model": QWEN, "input": "hi", "max_output_tokens": 2}
    for route, base, extra, param in (
        ("/chat/completions", chat, {"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ("/chat/completions", chat, {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice.function.name"),
        ("/chat/completions", chat, {"tool_choice": "required"}, "tool_choice"),
        ("/chat/completions", chat, {"tools": TOOLS, "tool_choice": {"type": "allowed_tools", "allowed_tools": {}}},
         "tool_choice.type"),
        ("/chat/completions", chat, {"functions": [WEATHER["function"]]}, "functions"),
        ("/chat/completions", chat, {"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ("/chat/completions", chat, {"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
        ("/chat/completions", chat, {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
         "tools[0].function.parameters.type"),
        ("/chat/completions", {**chat, "messages": ASK + [{"role": "tool", "content": "x"}]}, {}, "messages[1].tool_call_id"),
        ("/chat/completions", {**chat, "messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
         "function": {"name": "f", "arguments": {}}}]}]}, {}, "messages[0].tool_calls[0].function.arguments"),
        ("/chat/completions", chat, {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": "string", "pattern": "(["}}}}}], "tool_choice": "required"}, "tools"),
        ("/responses", resp, {"tools": [{"type": "file_search"}]}, "tools[0].type"),
        ("/responses", resp, {"tools": FLAT, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice.name"),
        ("/responses", {**resp, "input": [{"type": "function_call_output", "output": "x"}]}, {}, "input[0].call_id"),
        ("/responses", {**resp, "input": [{"type": "web_search_call"}]}, {}, "input[0]"),
    ):
        r = http.post(route, json={**base, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (route, extra, r.text)
    # every tool field given every JSON type: a 200 or a 400, never a 500
    odd = [[], {}, "x", -1, 1e308, True, None, [{}], [{"type": "function", "function": []}]]
    for route, base in (("/chat/completions", chat), ("/responses", resp)):
        for key in ("tools", "tool_choice", "parallel_tool_calls"):
            for value in odd:
                r = http.post(route, json={**base, key: value})
                assert r.status_code in (200, 400), (route, key, value, r.text)
    for value in odd:
        r = http.post("/chat/completions", json={**chat, "messages": [{"role": "assistant", "tool_calls": value}]})
        assert r.status_code in (200, 400), (value, r.text)
        r = http.post("/responses", json={**resp, "input": [{"type": "function_call", "call_id": "c", "name": "f",
                                                             "arguments": value}]})
        assert r.status_code in (200, 400), (value, r.text)


def test_a_call_written_freely_is_held_back_then_sent_as_a_call():
    """tool_choice auto: the model's own `<tool_call>` (a recorded generation through the server's code) is not
    streamed as text; chat sends it as tool_calls deltas, responses as a function_call item after the message."""
    from openai.types.chat import ChatCompletionChunk
    from openai.types.responses import ResponseStreamEvent
    from pydantic import TypeAdapter

    from grpo.api.chat import Choice, Tools, ToolSetup, chat_stream
    from grpo.api.inference import Loaded
    from grpo.api.responses import ResponseBuilder
    from grpo.models.loading import chat_tokenizer
    from grpo.rollout.prompts import special_tokens

    tok = chat_tokenizer("qwen3")
    loaded = Loaded(None, tok, special_tokens(tok), [tok.eos_token_id])
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima", "days": 1}}\n</tool_call>'
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    setup = ToolSetup(loaded, Tools(TOOLS, "auto", True), "low")

    chunks = [ChatCompletionChunk.model_validate(c) for c in
              sse_data("".join(chat_stream("m", [Choice(None, loaded, [1], {}, source=ids, tools=setup)], 1, False)))]
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert content == "Let me check." and all("<" not in (c.choices[0].delta.content or "") for c in chunks)
    calls = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or []]
    assert calls[0].function.name == "get_weather" and chunks[-1].choices[0].finish_reason == "tool_calls"
    assert json.loads("".join(tc.function.arguments for tc in calls)) == {"city": "Lima", "days": 1}

    builder = ResponseBuilder("m", {"tools": FLAT}, "low", {"temperature": 1.0, "top_p": 1.0})
    adapter = TypeAdapter(ResponseStreamEvent)
    events = [adapter.validate_python(e) for e in
              sse_data("".join(builder.stream(Choice(None, loaded, [1], {}, source=ids, tools=setup), 1)))]
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [i.type for i in done] == ["message", "function_call"] and done[0].content[0].text == "Let me check."
    assert events[-1].response.output[1].arguments == '{"city": "Lima", "days": 1}'


def test_constrained_rollouts_and_their_errors(one_thread):
    """engine.rollout.tool_choice: the prompts whose record has the function sample only schema-valid calls, in
    the shared-prefix loop (Qwen3) and through transformers' generate (GPT-OSS); the others are left free."""
    from grpo.config import RolloutConfig
    from grpo.data import Record
    from grpo.errors import UserError
    from grpo.rollout.constrain import rollout_grammars
    from grpo.rollout.generate import generate
    from grpo.rollout.prompts import encode_prompt
    from grpo.rollout.tools import parse_assistant, template_family

    recs = [Record(line=1, id="a", messages=ASK, reference_answer=None, metadata={}, tools=TOOLS),
            Record(line=2, id="b", messages=ASK, reference_answer=None, metadata={}, tools=None)]
    for kind in ("qwen3", "gpt_oss"):
        tok, model = _tiny(kind, seed=5)
        grammars = rollout_grammars(tok, recs, "get_weather")
        assert grammars[0] and grammars[1] is None
        out = generate(model, tok, [encode_prompt(tok, r.messages, tools=r.tools) for r in recs], n=2,
                       max_new_tokens=120, temperature=1.0, grammars=grammars)
        for i in range(len(out)):
            parsed = parse_assistant(tok.decode(out.response_ids[i]), template_family(tok), TOOLS)
            if out.group[i] == 0:
                assert not out.truncated[i] and parsed["parse_error"] is None, parsed
                (call,) = parsed["tool_calls"]
                valid_call("get_weather", call["function"]["arguments"])
            else:
                assert parsed["tool_calls"] == []
    # tool_choice required: several calls allowed (OpenAI's parallel_tool_calls default), or with
    # engine.rollout.parallel_tool_calls false exactly one, after which the row ends (finished, not truncated)
    tok, model = _tiny("qwen3", seed=5)
    assert '("\\n" call)*' in rollout_grammars(tok, recs, "required")[0]
    single = rollout_grammars(tok, recs, "required", parallel=False)
    assert '("\\n" call)*' not in single[0]
    out = generate(model, tok, [encode_prompt(tok, recs[0].messages, tools=TOOLS)], n=4, max_new_tokens=120,
                   temperature=1.0, grammars=single[:1])
    for i in range(len(out)):
        parsed = parse_assistant(tok.decode(out.response_ids[i]), template_family(tok), TOOLS)
        assert not out.truncated[i] and parsed["parse_error"] is None and len(parsed["tool_calls"]) == 1, parsed
    with pytest.raises(UserError, match="no record has a tool named 'nope'"):
        rollout_grammars(tok, recs, "nope")
    with pytest.raises(ValueError, match="expected 'auto', 'required' or a function name"):
        RolloutConfig(tool_choice="a b")


def test_without_llguidance_only_constrained_choices_fail(monkeypatch):
    import sys

    from grpo.api.chat import ToolSetup, Tools
    from grpo.api.errors import ApiError
    from grpo.api.inference import Loaded
    from grpo.rollout.constrain import ToolConstraints
    from grpo.rollout.prompts import end_token_ids, special_tokens

    monkeypatch.setitem(sys.modules, "llguidance", None)  # `import llguidance` now raises ImportError
    monkeypatch.setattr(ToolConstraints, "_cache", {})
    tok, model = _tiny("qwen3")
    loaded = Loaded(model, tok, special_tokens(tok), end_token_ids(tok, model))
    assert ToolSetup(loaded, Tools(TOOLS, "auto", True), "low").grammar is None
    with pytest.raises(ApiError) as err:
        ToolSetup(loaded, Tools(TOOLS, "required", True), "low")
    assert err.value.status == 400 and err.value.param == "tool_choice"
    assert "llguidance" in str(err.value.message) and "pip install" in str(err.value.message)


@pytest.mark.parametrize("kind,effort", [("qwen3", "low"), ("qwen3", "medium"), ("gpt_oss", "low"), ("gpt_oss", "medium")])
def test_the_grammar_accepts_the_calls_the_template_writes(kind, effort):
    """What the chat template renders for an assistant turn of calls (after the generation prompt, up to the end
    token) is exactly a path through the constraint's grammar, thinking included at medium effort; text
    around it is not."""
    from grpo.models.loading import chat_tokenizer
    from grpo.rollout.constrain import ToolConstraints, call_grammar
    from grpo.rollout.tools import render_messages, template_family

    tok = chat_tokenizer(kind)
    family = template_family(tok)
    made = ToolConstraints.for_tokenizer(tok, len(tok), [tok.eos_token_id])
    calls = [{"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": a}}
             for i, (n, a) in enumerate([("get_weather", '{"city": "Oslo", "days": 2}'), ("clock", "{}")])]
    for choice, turn_calls in ((("function", "get_weather"), calls[:1]), ("required", calls[:1 if kind == "gpt_oss" else 2])):
        turn = {"role": "assistant", "content": "", "tool_calls": turn_calls}
        if effort != "low":
            turn["reasoning_content"] = "The user wants weather."
        prompt = render_messages(tok, ASK, tools=TOOLS, reasoning_effort=effort)
        full = render_messages(tok, ASK + [turn], tools=TOOLS, add_generation_prompt=False, reasoning_effort=effort)
        end = "<|call|>" if kind == "gpt_oss" else "<|im_end|>"
        assert full.startswith(prompt), (prompt, full)
        said = full[len(prompt):]
        said = said[:said.index(end) + len(end)]
        row = made.new(call_grammar(tok, family, TOOLS, choice, thinking=effort != "low"), family)
        for t in tok(said, add_special_tokens=False)["input_ids"]:
            row.advance(t)
        assert row.finished, said
        bad = made.new(call_grammar(tok, family, TOOLS, choice, thinking=effort != "low"), family)
        with pytest.raises(RuntimeError, match="refused"):
            for t in tok("Sure! " + said, add_special_tokens=False)["input_ids"]:
                bad.advance(t)


GRADE_CALL = '''\
import json, re
LOG = {log!r}


def lambda_handler(event, context):
    if isinstance(event, dict):
        event = event["trajectories"]
    out = []
    for t in event:
        msg = t["messages"][-1]
        calls = [c["function"] for c in msg.get("tool_calls") or []]
        if not calls:  # the call as the template wrote it, where the engine passes the text
            calls = [json.loads(m) for m in re.findall(r"<tool_call>\\n(.*?)\\n</tool_call>", msg.get("content") or "", re.S)]
        with open(LOG, "a") as f:
            f.write(json.dumps(calls) + "\\n")
        args = [c["arguments"] if isinstance(c["arguments"], dict) else json.loads(c["arguments"]) for c in calls]
        score = float(bool(args) and args[0].get("city") == t["reference_answer"]["city"])
        out.append({{"id": t["id"], "aggregate_reward_score": score}})
    return out
'''


def test_a_training_job_samples_constrained_calls(tmp_path):
    """`grpo train` with engine.rollout.tool_choice naming a function: every sampled response the grader receives
    (training and validation) is a schema-valid call of it, from a random model that never writes one alone."""
    import torch
    from helpers_engine import read_jsonl, run_grpo, write_job, write_records

    tok, model = _tiny("qwen3", seed=4)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    del model, torch
    recs = [{"messages": [{"role": "user", "content": f"Weather in {c}?"}], "tools": TOOLS,
             "reference_answer": {"city": c}} for c in ("Oslo", "Lima")]
    train, val = write_records(tmp_path / "train.jsonl", recs), write_records(tmp_path / "val.jsonl", recs[:1])
    log = tmp_path / "calls.jsonl"
    (tmp_path / "grade.py").write_text(GRADE_CALL.format(log=str(log)))
    job = write_job(tmp_path / "job.yaml", tmp_path / "model", train, val, handler=tmp_path / "grade.py",
                    hyper={"training_sample_per_prompt": 2, "inference_max_tokens": 100},
                    engine={"rollout": {"tool_choice": "get_weather"}})
    proc = run_grpo("train", job, "--output-dir", tmp_path / "run", "--no-progress", timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    graded = read_jsonl(log)
    assert len(graded) >= 4 + 1  # one step of 2 prompts x 2 samples, and the validation sample(s)
    for calls in graded:
        (call,) = calls
        args = call["arguments"] if isinstance(call["arguments"], dict) else json.loads(call["arguments"])
        assert call["name"] == "get_weather" and valid_call("get_weather", json.dumps(args)) == args


def test_schema_refs_are_enforced_inside_the_hermes_call():
    """A function whose parameters use `$defs` / `$ref` (pydantic's schemas do): the refs resolve once the
    parameters sit under the call's `arguments`, and a value outside the referenced enum is refused."""
    from grpo.models.loading import chat_tokenizer
    from grpo.rollout.constrain import ToolConstraints, call_grammar

    tok = chat_tokenizer("qwen3")
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "$defs": {"C": {"type": "string", "enum": ["a", "b"]}},
        "properties": {"c": {"$ref": "#/$defs/C"}}, "required": ["c"]}}}
    made = ToolConstraints.for_tokenizer(tok, len(tok), [tok.eos_token_id])
    for value, ok in (("b", True), ("z", False)):
        row = made.new(call_grammar(tok, "qwen3", [tool], "required"), "qwen3")
        text = '<tool_call>\n{"name": "f", "arguments": {"c": "%s"}}\n</tool_call>' % value
        try:
            for t in tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]:
                row.advance(t)
            accepted = row.finished
        except RuntimeError:
            accepted = False
        assert accepted == ok, value
