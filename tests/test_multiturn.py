"""Multi-turn rollouts with tools that run (grpo.rollout.multiturn): an environment file's functions in worker
processes (answers, errors, a hung and a crashing tool), the sample -> call -> result -> sample loop on a real
tiny Qwen3 taught one tool conversation, max_turns and the token budget, and the response mask: the loss
trains the model's own tokens only (perturbing tool-result tokens leaves the gradients exactly as they were)."""

import json
from pathlib import Path

import pytest
import torch

from grpo.algorithms import core as alg
from grpo.errors import UserError
from grpo.models.forward import forward_logprobs
from grpo.models.tiny_tools import CALCULATOR_TOOLS
from grpo.rollout.multiturn import Conversation, ToolEnvironment, rollout_with_tools
from grpo.rollout.prompts import encode_prompt
from helpers_tools import QUESTION, teach_one_tool_conversation

torch.set_num_threads(1)
Q = QUESTION


@pytest.fixture(scope="module")
def env():
    with ToolEnvironment("envs/calculator.py") as e:
        yield e


@pytest.fixture(scope="module")
def taught():
    """A tiny random Qwen3 (the tool model's tokenizer) trained on one conversation until it repeats it: a call
    of multiply(12, 34), then, after the result, the answer."""
    return teach_one_tool_conversation()


def _rollout(taught, env, **kw):
    model, tok, _ = taught
    conv = Conversation([{"role": "user", "content": Q}], env.schemas)
    prompt = encode_prompt(tok, conv.messages, tools=conv.tools)
    torch.manual_seed(0)
    args = {"n": 2, "max_new_tokens": 80, "max_turns": 3, "temperature": 0.05}
    args.update(kw)
    return prompt, rollout_with_tools(model, tok, [prompt], [conv], env, **args)


def test_the_environment_describes_its_functions_and_runs_them(env):
    assert env.schemas == CALCULATOR_TOOLS  # what grpo:tiny-tools was pretrained with
    got = env.run([("multiply", {"a": 12, "b": 34}), ("add", {"a": 2, "b": 3}), ("multiply", {"a": 1})])
    assert [r.content for r in got[:2]] == ["408", "5"] and got[0].error is None
    assert got[2].content.startswith("error: TypeError: multiply() missing 1 required positional argument")
    assert got[2].error.startswith("[error] multiply: TypeError")


def test_a_failing_a_hung_and_a_crashing_tool_are_reported_and_the_workers_replaced():
    with ToolEnvironment("tests/envs/flaky.py", timeout_s=1.0, concurrency=1) as e:
        assert sorted(e.names) == ["crash", "fail", "hang", "multiply"]  # _helper is private
        fail, hang, crash, after = e.run([("fail", {"reason": "no"}), ("hang", {"seconds": 30}), ("crash", {}),
                                          ("multiply", {"a": 6, "b": 7})])
    assert fail.content == "error: RuntimeError: the tool failed: no" and "[error] fail" in fail.error
    assert hang.content == "error: handler did not answer within 1 s; worker killed and replaced"
    assert "[timeout] hang" in hang.error and "flaky.py\", line 24 in hang" in hang.error  # where it hung
    assert crash.content.startswith("error: worker process died while running the handler (exit status 7)")
    assert after.content == "42" and after.error is None


def test_an_environment_file_that_cannot_describe_its_tools_is_a_user_error(tmp_path):
    bad = tmp_path / "bad_env.py"
    bad.write_text("def lookup(key):\n    return key\n")
    with pytest.raises(UserError, match="tool lookup, parameter key: no type hint"):
        ToolEnvironment(str(bad))
    with pytest.raises(UserError, match="missing.py not found"):
        ToolEnvironment(str(tmp_path / "missing.py"))


def test_the_loop_calls_the_tool_reads_the_result_and_answers(taught, env):
    _, _, (p_ids, call_ids, glue_ids, answer_ids) = taught
    prompt, b = _rollout(taught, env)
    assert prompt == p_ids
    for i in range(2):
        msgs = b.messages[i]
        assert [m["role"] for m in msgs] == ["assistant", "tool", "assistant"]
        call = msgs[0]["tool_calls"][0]
        assert call["function"]["name"] == "multiply" and json.loads(call["function"]["arguments"]) == {"a": 12, "b": 34}
        assert msgs[1] == {"role": "tool", "tool_call_id": call["id"], "name": "multiply", "content": "408"}
        assert msgs[2] == {"role": "assistant", "content": "12 * 34 = 408\n#### 408"}
        # the response: the call, the template's tool turn, the answer; the mask is 1 on the model's tokens only
        n = int(b.response_lengths[i])
        assert b.packed.input_ids[i, len(prompt):len(prompt) + n].tolist() == call_ids + glue_ids + answer_ids
        mask = b.packed.response_mask[i, len(prompt) - 1:len(prompt) - 1 + n].tolist()
        assert mask == [1.0] * len(call_ids) + [0.0] * len(glue_ids) + [1.0] * len(answer_ids)
        assert float(b.packed.response_mask[i].sum()) == len(call_ids) + len(answer_ids)
    assert b.tool_stats["turns"] == [2, 2] and b.tool_stats["calls"] == [1, 1] and b.tool_stats["errors"] == [0, 0]
    assert b.contents == ["12 * 34 = 408\n#### 408"] * 2 and b.truncated.tolist() == [False, False]


def test_max_turns_ends_a_trajectory_at_a_call_without_running_it(taught, env):
    _, _, (_, call_ids, _, _) = taught
    _, b = _rollout(taught, env, max_turns=1)
    assert [[m["role"] for m in row] for row in b.messages] == [["assistant"], ["assistant"]]
    assert b.tool_stats["max_turns"] == [True, True] and b.tool_stats["calls"] == [0, 0]
    assert b.response_lengths.tolist() == [len(call_ids)] * 2


def test_the_token_budget_cuts_the_tool_result_and_ends_the_trajectory(taught, env):
    _, _, (_, call_ids, _, _) = taught
    budget = len(call_ids) + 5
    _, b = _rollout(taught, env, max_new_tokens=budget)
    assert b.response_lengths.tolist() == [budget] * 2 and b.truncated.tolist() == [True, True]
    assert [m["role"] for m in b.messages[0]] == ["assistant", "tool"]
    assert float(b.packed.response_mask[0].sum()) == len(call_ids)


def _grads(model, packed):
    model.zero_grad()
    logp, _ = forward_logprobs(model, packed, 1.0)
    adv = torch.full_like(logp, 0.7) * packed.response_mask
    out = alg.get_policy_loss("vanilla")(logp.detach(), logp, adv, packed.response_mask, clip_ratio_low=0.2,
                                         clip_ratio_high=0.2, clip_ratio_c=3.0, loss_agg_mode="token-mean")
    out.pg_loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).clone()


def test_tool_result_tokens_are_no_part_of_the_loss(taught, env):
    """Rows that end in a tool result (the budget cut them there): changing the result's tokens leaves the
    gradient bit for bit the same; changing one of the model's own tokens does not (the check can fail)."""
    model, tok, (_, call_ids, _, _) = taught
    prompt, b = _rollout(taught, env, max_new_tokens=len(call_ids) + 5)
    model.train()
    base = _grads(model, b.packed)
    start = len(prompt) + len(call_ids)  # the first tool-turn token
    perturbed = b.packed.input_ids.clone()
    perturbed[:, start:start + 5] = torch.randint(0, len(tok), (len(b), 5))
    assert not torch.equal(perturbed, b.packed.input_ids)
    other = type(b.packed)(perturbed, b.packed.attention_mask, b.packed.response_mask)
    assert torch.equal(_grads(model, other), base)
    own = b.packed.input_ids.clone()
    own[:, len(prompt) + 2] = (own[:, len(prompt) + 2] + 1) % len(tok)
    assert not torch.equal(_grads(model, type(b.packed)(own, b.packed.attention_mask, b.packed.response_mask)), base)
    model.eval()


def test_the_server_takes_an_environment_only_from_under_its_handlers_dir(tmp_path):
    import shutil

    import yaml
    from helpers_engine import write_data

    from grpo.api import jobs as J
    from grpo.api.errors import ApiError
    from grpo.api.policy import ServerPolicy
    from grpo.api.store import Store

    train, _ = write_data(tmp_path / "data", n_train=2, n_val=1)
    handlers = tmp_path / "handlers"
    (handlers / "envs").mkdir(parents=True)
    shutil.copyfile("rewards/final_number.py", handlers / "final_number.py")
    shutil.copyfile("envs/calculator.py", handlers / "envs" / "calculator.py")
    store = Store(tmp_path / "state")
    try:
        doc = {"id": "file-" + "d" * 24, "object": "file", "bytes": 1, "created_at": 1, "filename": "t.jsonl",
               "purpose": "fine-tune", "status": "processed", "expires_at": None, "status_details": None}
        shutil.copyfile(train, store.files_dir / f"{doc['id']}.jsonl")
        store.add_file(doc)
        policy = ServerPolicy(handlers_dir=handlers, base_models={"qwen.qwen3-32b": "grpo:tiny-tools"},
                              handler_env={"MODE": "x"})

        def create(environment):
            body = {"model": "qwen.qwen3-32b", "training_file": doc["id"], "method": {
                "type": "reinforcement", "reinforcement": {"grader": {"type": "lambda", "lambda": {
                    "function": "final_number.py"}}, "hyperparameters": {"batch_size": 1}}},
                "engine": {"environment": environment, "rollout": {"max_turns": 2}}}
            job = J.create_job(store, body, policy)
            return yaml.safe_load((J.job_dir(store, job["id"]) / "job.yaml").read_text())

        job = create("envs/calculator.py")
        assert job["engine"]["environment"] == str((handlers / "envs" / "calculator.py").resolve())
        assert job["engine"]["reward"]["env"] == {"MODE": "x"} and job["engine"]["rollout"]["max_turns"] == 2
        with pytest.raises(ApiError, match="engine.environment: .* is outside the handlers directory"):
            create(str(Path(__file__).resolve().parents[1] / "envs" / "calculator.py"))
    finally:
        store.close()


def test_the_tool_models_data_splits_never_share_a_problem():
    from grpo.models.tiny_tools import make_tool_records, pretrain_problems

    train = make_tool_records(300, seed=0, split="train")
    val = make_tool_records(50, seed=0, split="validation")
    pre = {(a, b) for a, b, _, _ in pretrain_problems(2000, seed=0, call_fraction=0.3)}
    pairs = lambda recs: {tuple(r["operands"]) for r in recs}
    assert not (pairs(train) & pairs(val)) and not (pairs(train) & pre) and not (pairs(val) & pre)
    assert all(r["reference_answer"] == f"#### {r['operands'][0] * r['operands'][1]}" for r in train + val)


HALF_TIED_HANDLER = '''\
"""Test reward: 0 for every response to a product ending in 4 (those groups tie), spread inside the others."""
import re


def lambda_handler(event, context):
    out = []
    for t in (event["trajectories"] if isinstance(event, dict) else event):
        product = re.findall(r"\\d+", str(t["reference_answer"]))[-1]
        text = "".join(m.get("content") or "" for m in t["messages"] if m["role"] == "assistant")
        out.append({"id": t["id"], "aggregate_reward_score": 0.0 if product.endswith("4") else 0.3 * (len(text) % 4)})
    return out
'''


def test_dynamic_sampling_combines_with_tools_that_run(taught, tmp_path):
    """engine.environment with engine.algorithm.filter_groups: the rounds' trajectories are joined group by group
    with their tool counters, so the step trains on groups with signal and still logs the tools' metrics."""
    import yaml

    from grpo.models.tiny_tools import make_tool_records
    from helpers_engine import job_dict, read_jsonl, run_grpo, write_records

    model, tok, _ = taught
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    records = make_tool_records(8, seed=0, split="train")  # 2 steps of 4 prompts
    train = write_records(tmp_path / "train.jsonl", records)
    handler = tmp_path / "half_tied.py"
    handler.write_text(HALF_TIED_HANDLER, encoding="utf-8")
    job = job_dict(tmp_path / "model", train, None, handler=handler,
                   hyper={"batch_size": 4, "inference_max_tokens": 40},
                   engine={"environment": "envs/calculator.py", "temperature": 1.0, "rollout": {"max_turns": 2},
                           "algorithm": {"filter_groups": {"enable": True, "max_num_gen_batches": 4}},
                           "checkpoint_interval": 10})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job), encoding="utf-8")
    r = run_grpo("train", tmp_path / "job.yaml", "--output-dir", tmp_path / "run", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    train_rows = [row for row in rows if "train_num_gen_batches" in row]
    assert len(train_rows) == 2
    # half the products end in 4 (their groups tie), so some step needed a second round and joined batches
    assert max(row["train_num_gen_batches"] for row in train_rows) >= 2
    for row in train_rows:
        assert row["dynamic_sampling_frac_tied_before"] > 0
        assert row["tools_turns_mean"] >= 1 and row["timing_s_tools"] >= 0 and "tools_calls_mean" in row
    samples = read_jsonl(tmp_path / "run" / "samples.jsonl")
    assert samples and all(s["messages"][0]["role"] == "assistant" for s in samples)
