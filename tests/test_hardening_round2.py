"""Issue 20, the second adversarial probe's findings, each against the real thing: a real `grpo serve` on
loopback with the real `openai` SDK and raw sockets, a real judge endpoint on loopback (it records every
request that reaches it), real handler files in worker processes, the CLI in subprocesses.

Items: 1 a client's engine.reward.env points no handler (nor the operator's key) anywhere, and a handler's
upstream reply text is withheld from the client; 2 an abandoned stream frees the generation lock at once;
3 one spelling of a checkpoint model id, never a 500; 4 chat/responses field types; 5 `grpo data filter`
with a huge score; 6 `grpo eval --base-url` to a non-API or invalid URL; 7 the judge's non-finite or
malformed score; 8 duplicate keys; 9 failed sign-ins throttled; 10 no server path in API answers;
11 validation in bounded memory; 12 scripts/bench_reward.py runs.
"""

from __future__ import annotations

import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import httpx
import openai
import pytest
from helpers_engine import GSM8K_HANDLER, PYTHON, REPO, build_model_dir, cli_env, write_data
from server_helpers import free_port, server_log, start_server, wait_for

KEY = "round2-key-0123456789abcdef"
JUDGE_KEY = "operator-judge-key-5550123"
SECRET = "UPSTREAM-REPLY-SECRET-7731"
HYPER = {"n_epochs": 1, "batch_size": 2, "training_sample_per_prompt": 2, "inference_max_tokens": 4}
ENGINE = {"checkpoint_interval": 1, "micro_batch_size": 4, "reward": {"concurrency": 1}, "log_with": ["none"],
          "lora": {"rank": 2, "alpha": 4}}
TERMINAL = ("succeeded", "failed", "cancelled")
FAIL_LIMIT, FAIL_WINDOW = 5, 3.0


class Judge(http.server.ThreadingHTTPServer):
    """An OpenAI-compatible judge on loopback that records each request and answers without a score, quoting
    a text only it knows (what a handler's error would echo)."""

    daemon_threads = True

    def __init__(self):
        self.seen: list[dict] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(inner):
                body = json.loads(inner.rfile.read(int(inner.headers.get("content-length", 0))) or b"{}")
                self.seen.append({"path": inner.path, "auth": inner.headers.get("authorization"), "body": body})
                answer = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [
                    {"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": f"I will not grade this. {SECRET}"}}]}).encode()
                inner.send_response(200)
                inner.send_header("content-type", "application/json")
                inner.send_header("content-length", str(len(answer)))
                inner.end_headers()
                inner.wfile.write(answer)

            def log_message(inner, *a):
                pass

        super().__init__(("127.0.0.1", 0), Handler)


def job_body(handler: str, env: dict | None = None, training_file: str | None = None) -> dict:
    reward = {"concurrency": 1, **({"env": env} if env is not None else {})}
    return {"model": "tiny", "training_file": training_file, "method": {"type": "reinforcement", "reinforcement": {
        "grader": {"type": "lambda", "lambda": {"function": "arn:aws:lambda:us-west-2:123456789012:function:g"}},
        "hyperparameters": HYPER}}, "engine": {**ENGINE, "handler": handler, "reward": reward}}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    d = tmp_path_factory.mktemp("round2")
    model = build_model_dir(d / "model", seed=3)
    train, _ = write_data(d / "data", n_train=2, n_val=1)
    handlers = d / "handlers"
    handlers.mkdir()
    shutil.copy(REPO / "rewards" / "llm_judge.py", handlers / "llm_judge.py")
    shutil.copy(GSM8K_HANDLER, handlers / "gsm8k.py")
    judge = Judge()
    threading.Thread(target=judge.serve_forever, daemon=True).start()
    judge_url = f"http://127.0.0.1:{judge.server_address[1]}/v1"
    args = ["--model", f"tiny={model}", "--handler-env", "JUDGE_API_KEY", "--handler-env", f"JUDGE_BASE_URL={judge_url}",
            "--handler-env", "JUDGE_RETRIES=0", "--client-env", "JUDGE_MODEL", "--client-env", "JUDGE_RUBRIC",
            "--auth-fail-limit", str(FAIL_LIMIT), "--auth-fail-window", str(FAIL_WINDOW)]
    state = d / "state"
    # The server runs with Python's cycle collector off: an abandoned response generator caught in a reference
    # cycle is then never collected, the worst case of "whenever the collector gets to it" (item 2).
    site = d / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import gc\ngc.disable()\n")
    env = {"JUDGE_API_KEY": JUDGE_KEY, "PYTHONPATH": str(site)}
    try:
        with start_server(state, handlers, KEY, args, env=env) as (url, key, proc):
            client = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=120)
            http_ = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
            f = client.files.create(file=train.open("rb"), purpose="fine-tune")
            yield {"client": client, "http": http_, "url": url, "state": state, "handlers": handlers, "file": f.id,
                   "judge": judge, "judge_url": judge_url, "dir": d}
            http_.close()
    finally:
        judge.shutdown()


def _run_job(served, body) -> dict:
    r = served["http"].post("/fine_tuning/jobs", json=body)
    assert r.status_code == 200, r.text
    job_id = r.json()["id"]
    return wait_for(lambda: (j := served["http"].get(f"/fine_tuning/jobs/{job_id}").json())["status"] in TERMINAL
                    and j, 240, f"job {job_id}")


@pytest.fixture(scope="module")
def succeeded(served):
    """A job graded by gsm8k.py that succeeds (one step, one checkpoint)."""
    job = _run_job(served, job_body("gsm8k.py", training_file=served["file"]))
    assert job["status"] == "succeeded", (job["error"], server_log(served["state"])[-3000:])
    return job


# -- 1 ----------------------------------------------------------------------------------------------------------
def test_1_a_clients_env_cannot_point_a_handler_anywhere_and_upstream_replies_are_withheld(served):
    http_, judge = served["http"], served["judge"]
    refused = {
        "JUDGE_BASE_URL": {"JUDGE_BASE_URL": "http://127.0.0.1:9/v1", "JUDGE_MODEL": "m"},  # not allowed by name
        "JUDGE_API_KEY": {"JUDGE_API_KEY": "x", "JUDGE_MODEL": "m"},  # the operator passes it: never a client's
        "a URL": {"JUDGE_MODEL": "http://127.0.0.1:9/v1"},  # an allowed name, but a URL as its value
        "UNC": {"JUDGE_RUBRIC": "//evil.example/x"},
    }
    for why, env in refused.items():
        r = http_.post("/fine_tuning/jobs", json=job_body("llm_judge.py", env, served["file"]))
        assert r.status_code == 400, (why, r.text)
        assert r.json()["error"]["param"] == "engine.reward.env", why
    assert judge.seen == []  # nothing was started, nothing was sent

    job = _run_job(served, job_body("llm_judge.py", {"JUDGE_MODEL": "judge-m"}, served["file"]))
    assert job["status"] == "failed"
    # the judge was called at the operator's URL with the operator's key and the client's allowed model name
    assert judge.seen and all(s["auth"] == f"Bearer {JUDGE_KEY}" and s["body"]["model"] == "judge-m"
                              for s in judge.seen)
    events = http_.get(f"/fine_tuning/jobs/{job['id']}/events", params={"limit": 100}).json()["data"]
    seen_by_client = json.dumps(job) + json.dumps(events)
    assert SECRET not in seen_by_client and JUDGE_KEY not in seen_by_client
    assert "withheld" in job["error"]["message"] and "[malformed]" in job["error"]["message"]
    log = served["state"] / "jobs" / job["id"] / "run" / "reward_errors.log"
    assert SECRET in log.read_text()  # the operator still has the handler's own words


def test_1_the_operator_cannot_open_an_endpoint_or_a_passed_name_to_clients(served):
    for name, why in (("JUDGE_BASE_URL", "address"), ("MY_ENDPOINT", "address"), ("AWS_PROFILE", "credential"),
                      ("JUDGE_API_KEY", "sets or passes")):
        cmd = [PYTHON, "-m", "grpo", "serve", "--handlers-dir", str(served["handlers"]), "--state-dir",
               str(served["dir"] / "never"), "--handler-env", "JUDGE_API_KEY", "--client-env", name]
        out = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=60)
        assert out.returncode == 2 and why in out.stderr and "Traceback" not in out.stderr, out.stderr


# -- 2 ----------------------------------------------------------------------------------------------------------
def test_2_an_abandoned_stream_never_blocks_the_next_chat(served):
    """Read one chunk of a long, hot stream, close the socket, chat at once: 12 times, each chat answered
    well within its timeout (before the fix a chat waited until the abandoned generator was collected)."""
    url = served["url"]
    long = {"model": "tiny", "messages": [{"role": "user", "content": "count"}], "max_tokens": 32768,
            "temperature": 2.0, "stream": True}
    short = {"model": "tiny", "messages": [{"role": "user", "content": "1+1"}], "max_tokens": 4, "temperature": 0}
    headers = {"Authorization": f"Bearer {KEY}"}
    for i in range(12):
        with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
            with c.stream("POST", "/chat/completions", json=long) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        break  # one chunk, then the socket closes with the client
        t0 = time.monotonic()
        r = httpx.post(f"{url}/chat/completions", json=short, headers=headers, timeout=45)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None, (i, r.text)
        assert time.monotonic() - t0 < 45


# -- 3 ----------------------------------------------------------------------------------------------------------
def test_3_checkpoint_model_ids_have_one_spelling_and_never_500(served, succeeded):
    client, http_ = served["client"], served["http"]
    base = succeeded["fine_tuned_model"]
    assert client.models.retrieve(f"{base}:ckpt-step-1").id == f"{base}:ckpt-step-1"
    for bad in (f"{base}:ckpt-step-{'9' * 5000}", f"{base}:ckpt-step-01", f"{base}:ckpt-step-0000000000000001"):
        assert http_.get(f"/models/{bad}").status_code == 404
        for path, body in (("/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                           ("/responses", {"input": "hi"})):
            r = http_.post(path, json={"model": bad, "max_tokens": 2, **body} if path == "/chat/completions"
                           else {"model": bad, "max_output_tokens": 16, **body})
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", (path, r.text[:200])


# -- 4 ----------------------------------------------------------------------------------------------------------
def test_4_chat_and_response_fields_of_the_wrong_type_are_400(served):
    http_ = served["http"]
    msg = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    rsp = {"model": "tiny", "input": "hi", "max_output_tokens": 16}
    cases = [("/chat/completions", {**msg, "temperature": float("nan")}, "temperature"),
             ("/chat/completions", {**msg, "top_p": float("nan")}, "top_p"),
             ("/chat/completions", {**msg, "stream": "yes"}, "stream"),
             ("/chat/completions", {**msg, "metadata": {"a": 1}}, "metadata"),
             ("/responses", {**rsp, "temperature": float("nan")}, "temperature"),
             ("/responses", {**rsp, "stream": 1}, "stream"),
             ("/responses", {**rsp, "instructions": [1]}, "instructions"),
             ("/responses", {**rsp, "metadata": {"k": {"x": 1}}}, "metadata"),
             ("/responses", {**rsp, "metadata": {f"k{i}": "v" for i in range(17)}}, "metadata")]
    for path, body, param in cases:
        r = http_.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (path, param, r.text[:300])


# -- 5, 6 -------------------------------------------------------------------------------------------------------
def _cli(*args, timeout=120):
    out = subprocess.run([PYTHON, "-m", "grpo", *args], capture_output=True, text=True, env=cli_env(), timeout=timeout)
    assert "Traceback" not in out.stderr, out.stderr
    return out


def test_5_a_score_too_large_for_a_float_is_a_reported_problem(tmp_path):
    scores = tmp_path / "scores.jsonl"
    scores.write_text(json.dumps({"id": "a#0", "score": 0}) + "\n" + '{"id": "a#1", "score": ' + "9" * 400 + "}\n")
    out = _cli("data", "filter", "--scores", str(scores), "--pass-rate", "0.1:0.9", "--out", str(tmp_path / "o"))
    assert out.returncode == 2 and f"{scores}:2: score: expected a number or null" in out.stderr and "finite" in out.stderr


def test_6_eval_against_something_that_is_not_the_api_says_so(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "1+1?"}], "reference_answer": "2"}) + "\n")

    class Html(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length", 0)))
            page = b"<html><body>Welcome to nginx!</body></html>"
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Html)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        common = ["--model", "m", "--data", str(data), "--handler", str(GSM8K_HANDLER), "--api-key", "k"]
        out = _cli("eval", "--base-url", f"http://127.0.0.1:{server.server_address[1]}/v1", *common)
        assert out.returncode == 2 and "not with a chat completion" in out.stderr and "nginx" in out.stderr
    finally:
        server.shutdown()
    for url, why in (("http://256.1.1.1/v1", "not a valid URL"), ("http://127.0.0.1:99999/v1", "not a valid URL"),
                     ("http:///v1", "no host")):
        out = _cli("eval", "--base-url", url, *common)
        assert out.returncode == 2 and why in out.stderr, (url, out.stderr)


# -- 7, 8 -------------------------------------------------------------------------------------------------------
def test_7_the_judge_reads_no_score_out_of_a_bigger_or_non_finite_number():
    sys.path.insert(0, str(REPO / "rewards"))
    try:
        import llm_judge as judge
    finally:
        sys.path.pop(0)
    default = re.compile(judge.DEFAULT_PATTERN, re.IGNORECASE)
    greedy = re.compile(r"score\s*[:=]\s*(\S+)", re.IGNORECASE)  # an operator's pattern that takes any token
    assert judge.parse_score("Score: 7", default, 10) == 7.0 and judge.parse_score("Score: 7.5\nok", default, 10) == 7.5
    assert judge.parse_score("Score: 7 of 10", default, 10) == 7.0
    for reply, pattern in (("Score: 1e400", default), ("Score: 1E+2", default), ("score: 7.5.1", default),
                           ("Score: 1e400", greedy), ("Score: nan", greedy), ("Score: inf", greedy),
                           ("Score: -0.5", default), ("Score: 11", default)):
        with pytest.raises(judge.JudgeFailure):
            judge.parse_score(reply, pattern, 10)


def test_8_a_key_given_twice_is_reported(tmp_path):
    from grpo.data import validate_file

    rec = {"messages": [{"role": "user", "content": "1+1?"}]}
    text = json.dumps(rec)[:-1] + ', "reference_answer": "2", "reference_answer": "3"}\n'
    text += '{"messages": [{"role": "user", "content": "a", "content": "b"}], "reference_answer": "x"}\n'
    (tmp_path / "d.jsonl").write_text(text)
    rep = validate_file(tmp_path / "d.jsonl", allow_small=True)
    assert [(p.line, p.field) for p in rep.problems] == [(1, "reference_answer"), (2, "content")]
    assert "appears twice" in rep.problems[0].message and not rep.records


# -- 9 ----------------------------------------------------------------------------------------------------------
def test_9_failed_sign_ins_are_throttled_per_address_and_a_correct_key_is_not(served):
    url = served["url"]
    with httpx.Client(base_url=url, timeout=30) as c:
        for _ in range(3 * FAIL_LIMIT):  # many correct requests: none is delayed or counted
            assert c.get("/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        codes = [c.get("/models", headers={"Authorization": f"Bearer wrong-{i}"}).status_code
                 for i in range(FAIL_LIMIT + 3)]
        assert codes == [401] * FAIL_LIMIT + [429] * 3
        r = c.get("/models", headers={"Authorization": "Bearer wrong-again"})
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= FAIL_WINDOW + 1
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        # while throttled, the address waits whatever key it sends (an answer would say whether a guess was right)
        assert c.get("/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 429
        base = url.rsplit("/v1", 1)[0]
        login = httpx.post(f"{base}/console/login", data={"key": "guess", "next": "/console/"}, timeout=30)
        assert login.status_code == 429 and "retry-after" in login.headers
        time.sleep(FAIL_WINDOW + 0.2)
        assert c.get("/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        login = httpx.post(f"{base}/console/login", data={"key": "guess", "next": "/console/"}, timeout=30)
        assert login.status_code == 303 and "failed=1" in login.headers["location"]  # counted again, one by one


def test_9_the_throttle_window_slides():
    from grpo.api.limits import AuthThrottle

    now = [0.0]
    t = AuthThrottle(limit=3, window_s=10, max_addresses=2, clock=lambda: now[0])
    for s in (0, 1, 2):
        now[0] = s
        assert t.retry_after("a") is None
        t.failed("a")
    assert t.retry_after("a") == 8  # the failure at 0 leaves the window at 10
    now[0] = 10.5
    assert t.retry_after("a") is None
    t.failed("b"), t.failed("c")  # a third address: the least recently failed one ("a") is forgotten
    assert "a" not in t._fails and set(t._fails) == {"b", "c"}


# -- 10 ---------------------------------------------------------------------------------------------------------
def test_10_no_server_path_in_an_api_answer(served, succeeded):
    http_ = served["http"]
    state, handlers = str(served["state"].resolve()), str(served["handlers"].resolve())
    r = http_.post("/fine_tuning/jobs", json=job_body("missing.py", training_file=served["file"]))
    assert r.status_code == 400 and "$HANDLERS" in r.json()["error"]["message"]
    r2 = http_.post("/fine_tuning/jobs", json=job_body("../outside.py", training_file=served["file"]))
    answers = [r.text, r2.text, http_.get("/fine_tuning/jobs", params={"limit": 50}).text]
    for job in http_.get("/fine_tuning/jobs", params={"limit": 50}).json()["data"]:
        answers.append(http_.get(f"/fine_tuning/jobs/{job['id']}/events", params={"limit": 100}).text)
        answers.append(http_.get(f"/fine_tuning/jobs/{job['id']}/checkpoints").text)
    assert any("$STATE" in a or "$HANDLERS" in a for a in answers)
    for text in answers:
        assert state not in text and handlers not in text


# -- 11 ---------------------------------------------------------------------------------------------------------
def test_11_validation_memory_does_not_grow_with_the_file(tmp_path):
    """Bad lines are all counted but only the first MAX_KEPT_PROBLEMS kept; past max_records, records and ids
    are counted, not remembered: a file 8x longer peaks at about the same memory."""
    from grpo.data import MAX_KEPT_PROBLEMS, validate_file

    def write(path, n):
        good = {"messages": [{"role": "user", "content": "What is 2 plus 2?"}], "reference_answer": "4", "src": "t"}
        with open(path, "w") as f:
            for i in range(n):
                f.write(json.dumps({"id": f"r{i}", **good}) + "\n" if i % 2 else '{"messages": 1}\n')
        return path

    peaks = []
    for n in (4_000, 32_000):
        path = write(tmp_path / f"{n}.jsonl", n)
        tracemalloc.start()
        rep = validate_file(path, max_records=1_000, keep_records=False)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        per_line = len(validate_file(write(tmp_path / "one.jsonl", 1), allow_small=True).problems)
        assert rep.problem_count == n // 2 * per_line + 1  # every bad line's problems, and the count's
        assert len(rep.problems) == MAX_KEPT_PROBLEMS + 1 and rep.summary["valid_records"] == n // 2 and not rep.records
        assert rep.problems[-1].line is None and f"{n:,} records; Bedrock accepts at most 1,000" in str(rep.problems[-1])
        assert rep.problem_lines()[-1].startswith(f"{rep.problem_count:,} problems")
    assert peaks[1] < 1.5 * peaks[0], peaks


# -- 12 ---------------------------------------------------------------------------------------------------------
def test_12_bench_reward_runs_and_its_check_holds():
    if not any((d / "data" / "gsm8k" / "example_model_solutions.jsonl").is_file() for d in (REPO / "shared", REPO.parent / "shared")):
        pytest.skip("needs shared/data/gsm8k next to the repository (where bench_reward.py looks)")
    out = subprocess.run([PYTHON, str(REPO / "scripts" / "bench_reward.py"), "--repeats", "1"], capture_output=True,
                         text=True, env=cli_env(), timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    agree = re.search(r"scores agreeing with is_correct: (\d+) / (\d+); failures: 0", out.stdout)
    assert agree and agree[1] == agree[2], out.stdout
