"""The console (`grpo serve`'s pages at /console/) in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`, driven by selenium) on a real server on loopback with real jobs of a tiny random Qwen3: one
finished, one failed (its handler raises), one running (its handler is paced; the test cancels it with the
page's button), and a run directory pulled with `grpo pull` under the state dir's runs/ for the compare view.

User data that looks like HTML (a job's metadata name, a handler's metric name, a handler's error text) must
show as text. Screenshots are written to the test's tmp dir, and to $GRPO_CONSOLE_SHOTS when it is set.
The browser tests skip, saying why, only where Chromium or its driver is not installed
(scripts/install_test_deps.sh); the HTTP checks of auth, CSRF and files run everywhere.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import openai
import pytest
from helpers_engine import REPO, VARIED_HANDLER, build_model_dir, run_grpo, write_data, write_records
from helpers_tools import QUESTION, teach_one_tool_conversation
from server_helpers import server_log, start_server, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium
except ImportError:  # pragma: no cover - the dev extra installs it
    selenium = None
NO_BROWSER = None if CHROMIUM and CHROMEDRIVER and selenium else (
    "needs Chromium and its driver (as root: scripts/install_test_deps.sh, i.e. apt-get install chromium "
    "chromium-driver) and selenium (pip install -e '.[dev]')")

KEY = "console-test-key-0123456789"
XSS_NAME = "<img src=x onerror=\"window.__xss='name'\">"
XSS_METRIC = "<b onmouseover=\"window.__xss='metric'\">len</b>"
XSS_ERROR = "<script>window.__xss='error'</script> the grader could not parse the answer"
XSS_PROMPT = "<img src=x onerror=\"window.__xss='prompt'\"> " + QUESTION
HYPER = {"n_epochs": 1, "batch_size": 2, "training_sample_per_prompt": 4, "inference_max_tokens": 8}
ENGINE = {"checkpoint_interval": 2, "micro_batch_size": 4, "reward": {"concurrency": 1}, "log_with": ["none"],
          "lora": {"rank": 4, "alpha": 8}, "base_learning_rate": 5e-3}
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1900"]


def body(handler: str, hyper=None, metadata=None) -> dict:
    b = {"method": {"type": "reinforcement", "reinforcement": {
        "grader": {"type": "lambda", "lambda": {"function": handler}}, "hyperparameters": {**HYPER, **(hyper or {})}}},
        "engine": ENGINE}
    return {**b, "metadata": metadata} if metadata else b


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A server with a finished, a failed and a running job, a finished job with tools that run (a tiny model
    taught one calculator conversation, engine.environment), and a pulled copy of the first finished one."""
    d = tmp_path_factory.mktemp("console")
    model = build_model_dir(d / "model", seed=3)
    train, val = write_data(d / "data", n_train=8, n_val=2)
    tool_model, tool_tok, _ = teach_one_tool_conversation()
    tool_model.save_pretrained(d / "tool_model")
    tool_tok.save_pretrained(d / "tool_model")
    tool_records = [{"messages": [{"role": "user", "content": q}], "reference_answer": "#### 408"}
                    for q in (XSS_PROMPT, QUESTION, QUESTION, XSS_PROMPT)]  # 2 steps of 2 prompts
    tool_train = write_records(d / "tools.jsonl", tool_records)
    handlers = d / "handlers"
    handlers.mkdir()
    (handlers / "envs").mkdir()
    shutil.copy(REPO / "envs" / "calculator.py", handlers / "envs" / "calculator.py")
    shutil.copy(REPO / "rewards" / "final_number.py", handlers / "final_number.py")
    (handlers / "named.py").write_text(VARIED_HANDLER.replace('"name": "length_mod3"', f'"name": {XSS_METRIC!r}'))
    (handlers / "paced.py").write_text(VARIED_HANDLER.replace(
        'time.sleep(float(os.environ.get("TEST_REWARD_SLEEP_S", "0")))', "time.sleep(1.5)"))
    (handlers / "broken.py").write_text(f"def lambda_handler(event, context):\n    raise ValueError({XSS_ERROR!r})\n")
    state = d / "state"
    # the tiny model is served under its own path (--model PATH=PATH), so jobs naming it pass a server that
    # lets jobs train only the models it serves
    # --show-handler-errors: the broken handler's own (hostile) text reaches the page, which must show it as text
    with start_server(state, handlers, KEY, ["--max-jobs", "3", "--model", f"{model}={model}",
                                             "--model", f"{d / 'tool_model'}={d / 'tool_model'}",
                                             "--show-handler-errors"]) as (url, key, _proc):
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)
        tid = client.files.create(file=train.open("rb"), purpose="fine-tune").id
        vid = client.files.create(file=val.open("rb"), purpose="fine-tune").id
        create = lambda handler, **kw: client.fine_tuning.jobs.create(
            model=str(model), training_file=tid, validation_file=vid, extra_body=body(handler, **kw)).id
        done = create("named.py", hyper={"eval_interval": 2}, metadata={"name": XSS_NAME})
        failed = create("broken.py")
        running = create("paced.py", hyper={"n_epochs": 6})
        tools = client.fine_tuning.jobs.create(
            model=str(d / "tool_model"), training_file=client.files.create(file=tool_train.open("rb"), purpose="fine-tune").id,
            extra_body={**body("final_number.py", hyper={"inference_max_tokens": 80}),
                        "engine": {**ENGINE, "environment": "envs/calculator.py", "rollout": {"max_turns": 2}}}).id
        status = lambda j: client.fine_tuning.jobs.retrieve(j).status
        final = wait_for(lambda: (s := status(done)) in ("succeeded", "failed", "cancelled") and s, 240,
                         "the first job to finish")
        assert final == "succeeded", server_log(state)[-3000:]
        wait_for(lambda: status(failed) == "failed", 120, "the failing job to fail")
        assert wait_for(lambda: (s := status(tools)) in ("succeeded", "failed", "cancelled") and s, 240,
                        "the job with tools to finish") == "succeeded", server_log(state)[-3000:]
        run_metrics = state / "jobs" / running / "run" / "metrics.jsonl"
        wait_for(lambda: run_metrics.is_file() and run_metrics.read_text().count("\n") >= 1, 120,
                 "the running job's first step")
        pulled = run_grpo("pull", done, "--out", state / "runs" / "pulled", "--base-url", url, "--api-key", key)
        assert pulled.returncode == 0, pulled.stderr
        yield {"url": url.removesuffix("/v1"), "client": client, "done": done, "failed": failed, "running": running,
               "tools": tools,
               "state": state, "dir": d}


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    d = Path(os.environ.get("GRPO_CONSOLE_SHOTS") or tmp_path_factory.mktemp("shots"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def browser(site, tmp_path_factory):
    if NO_BROWSER:
        pytest.skip(NO_BROWSER)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    for flag in [*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        driver.get(site["url"] + "/console/")  # not signed in: the login form, which keeps where we were going
        assert "/console/login" in driver.current_url
        driver.find_element("id", "key").send_keys("not-the-key")
        driver.find_element("id", "signin").click()
        wait(driver, lambda d: "failed=1" in d.current_url and d.find_element("id", "failed").is_displayed())
        driver.find_element("id", "key").send_keys(KEY)
        driver.find_element("id", "signin").click()
        wait(driver, lambda d: d.execute_script("return document.body.dataset.loaded") == "1")
        yield driver
    finally:
        driver.quit()


def wait(driver, fn, timeout: float = 20):
    """Poll `fn(driver)` until truthy; on a timeout, fail with the page's URL and the browser's console log."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(fn)
    except TimeoutException:
        logs = "\n".join(e["message"] for e in driver.get_log("browser"))
        page = driver.find_element("tag name", "body").text[:2000]
        raise AssertionError(f"timed out after {timeout:g} s on {driver.current_url}; browser console:\n{logs}\n"
                             f"the page shows:\n{page}") from None


def texts(driver, css: str) -> list[str]:
    return [e.text for e in driver.find_elements("css selector", css)]


def open_job(driver, site, job: str) -> None:
    """Load a job's page and wait until one refresh has drawn all of it (facts, charts, lists, events)."""
    driver.get(f"{site['url']}/console/jobs/{job}")
    wait(driver, lambda d: int(d.execute_script("return document.body.dataset.refreshes || '0'")) >= 1)


def no_injection(driver) -> None:
    """Nothing a user wrote ran or became markup: no flag set, no <img>/<b>/<script> from user data."""
    assert driver.execute_script("return window.__xss === undefined")
    assert driver.find_elements("css selector", "main img, main b[onmouseover], main script") == []


# -- over HTTP: auth, CSRF, files ------------------------------------------------------------------------
def test_nothing_without_the_key_and_csrf_on_state_changes(site):
    base, running = site["url"], site["running"]
    with httpx.Client(base_url=base, timeout=30) as anon:
        assert anon.get("/").headers["location"] == "/console/"
        r = anon.get("/console/jobs/" + running)
        assert r.status_code == 303 and r.headers["location"].startswith("/console/login?next=")
        for path in ("/console/api/jobs", "/console/static/console.js", "/console/static/vendor/uPlot.iife.min.js",
                     f"/console/api/jobs/{running}/metrics", f"/console/api/jobs/{running}/samples",
                     "/console/api/compare?a=run:pulled&b=run:pulled"):
            assert anon.get(path).status_code == 401, path
        assert anon.get("/console/login").status_code == 200  # the form and its stylesheet only
        assert anon.get("/console/static/console.css").status_code == 200
        port = base.rsplit(":", 1)[1]
        forged = httpx.get(f"{base}/v1/fine_tuning/jobs", headers={"Cookie": f"grpo_console_{port}=forged"})
        assert forged.status_code == 401
        bad = anon.post("/console/login", data={"key": "wrong", "next": "/console/"})
        assert bad.status_code == 303 and "failed=1" in bad.headers["location"] and "set-cookie" not in bad.headers
        assert anon.post("/console/login", content=b"key=" + b"k" * 100_000).status_code == 413
        other = anon.post("/console/login", data={"key": KEY}, headers={"Origin": "http://evil.example"})
        assert other.status_code == 403 and "set-cookie" not in other.headers
        ok = anon.post("/console/login", data={"key": KEY, "next": "https://evil.example/"})
        assert ok.status_code == 303 and ok.headers["location"] == "/console/"  # never sends you off-site
        cookie = ok.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and KEY not in cookie
        page = anon.get("/console/")
        assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
        assert "'unsafe-inline'" not in page.headers["content-security-policy"]
        # the pages' JSON goes through the API's own auth: the cookie stands in for the key on /v1
        assert anon.get("/v1/fine_tuning/jobs").status_code == 200
        csrf = anon.get("/console/api/session").json()["csrf"]
        cancel = f"/v1/fine_tuning/jobs/{running}/cancel"
        assert anon.post(cancel).json()["error"]["code"] == "csrf_failed"  # no token: refused, job untouched
        assert anon.post(cancel, headers={"X-CSRF-Token": "guess"}).status_code == 403
        # another origin on this host (cookies ignore ports), even with the token: 403 csrf_failed, as
        # docs/console.md promises, on /v1 and /console alike; a read from there is not let in (401)
        for cross in ({"Origin": "http://127.0.0.1:1"}, {"Sec-Fetch-Site": "same-site"}):
            for path in (cancel, "/console/logout"):
                r = anon.post(path, headers={"X-CSRF-Token": csrf, **cross})
                assert (r.status_code, r.json()["error"]["code"]) == (403, "csrf_failed"), (path, cross)
        for path in ("/v1/fine_tuning/jobs", "/console/api/jobs", "/console/static/console.js"):
            assert anon.get(path, headers={"Sec-Fetch-Site": "same-site"}).status_code == 401, path
        assert anon.post("/console/logout", headers={"X-CSRF-Token": "guess"}).status_code == 403
        assert site["client"].fine_tuning.jobs.retrieve(running).status == "running"
        # files: the packaged list only; runs only under the state dir
        for path in ("/console/static/../console.py", "/console/static/%2e%2e/console.py", "/console/static/job.html"):
            assert anon.get(path).status_code == 404, path
        outside = site["dir"] / "outside-run"
        shutil.copytree(site["state"] / "runs" / "pulled", outside)
        (site["state"] / "runs" / "escape").symlink_to(outside)
        for spec, code in (("run:..", 400), ("run:escape", 404), ("run:../jobs", 400), ("job:../../etc", 404),
                           ("file:/etc/passwd", 400)):
            r = anon.get("/console/api/compare", params={"a": spec, "b": "run:pulled"})
            assert r.status_code == code, (spec, r.text)
        assert [r["name"] for r in anon.get("/console/api/jobs").json()["runs"]] == ["pulled"]
        assert anon.post("/console/logout", headers={"X-CSRF-Token": csrf}).status_code == 204
        assert anon.get("/console/api/jobs").status_code == 401  # the session is gone server-side too
    with httpx.Client(base_url=base, timeout=30, headers={"Authorization": f"Bearer {KEY}"}) as scripted:
        assert scripted.get("/console/api/jobs").status_code == 200  # the API key works for the JSON too


# -- in the browser ---------------------------------------------------------------------------------------
def test_jobs_list_shows_every_job_with_user_text_as_text(site, browser, shots):
    browser.get(site["url"] + "/console/")
    wait(browser, lambda d: len(d.find_elements("css selector", "#jobs-table tbody tr")) == 4)
    rows = {r.get_attribute("data-job"): r.text for r in browser.find_elements("css selector", "#jobs-table tbody tr")}
    assert "succeeded" in rows[site["done"]] and "4/4" in rows[site["done"]]
    assert "failed" in rows[site["failed"]] and "running" in rows[site["running"]]
    assert "succeeded" in rows[site["tools"]] and "2/2" in rows[site["tools"]]
    name = browser.find_element("css selector", f"tr[data-job='{site['done']}'] td.name")
    assert name.text == XSS_NAME
    assert "runs/pulled" in browser.find_element("id", "runs-table").text
    no_injection(browser)
    browser.save_screenshot(str(shots / "console_jobs.png"))


def test_finished_job_page(site, browser, shots):
    job = site["done"]
    open_job(browser, site, job)
    assert browser.execute_script("return document.body.dataset.points") == "5"  # the baseline + 4 steps
    baseline = next(e.data["val_score_rewards_mean"] for e in site["client"].fine_tuning.jobs.list_events(job, limit=100)
                    if (e.data or {}).get("step") == 0 and "val_score_rewards_mean" in e.data)
    cols = httpx.get(f"{site['url']}/console/api/jobs/{job}/metrics", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert cols["steps"] == [0, 1, 2, 3, 4] and cols["series"]["val_score_rewards_mean"][0] == baseline
    assert cols["series"]["critic_rewards_mean"][0] is None
    charts = browser.find_elements("css selector", ".chart")
    assert [c.get_attribute("data-metric") for c in charts] == [
        "critic_rewards_mean", "actor_pg_loss", "actor_entropy", "actor_grad_norm", "critic_advantages_mean",
        "response_length_mean", "reward_metrics"]
    assert all(c.find_elements("css selector", "canvas") for c in charts)
    legend = texts(browser, ".chart[data-metric=critic_rewards_mean] .u-legend th")
    assert any("validation" in t for t in legend) and any("train" in t for t in legend)
    handler_legend = " ".join(texts(browser, ".chart[data-metric=reward_metrics] .u-legend th"))
    assert f"reward_{XSS_METRIC}_mean" in handler_legend  # the handler's metric name, as text
    ckpts = texts(browser, "#checkpoints-table .model-id")
    assert ckpts == [f"ft:{site['client'].fine_tuning.jobs.retrieve(job).model}:grpo:{job}:ckpt-step-{s}" for s in (4, 2)]
    messages = texts(browser, "#events-table td.message")
    assert messages[0] == "The job has successfully completed" and messages[-1] == f"Created fine-tuning job: {job}"
    assert not any(m.startswith("Step ") for m in messages)  # per-step metrics events hidden until asked for
    browser.find_element("id", "show-metrics").click()
    assert "Step 4/4: training metrics" in texts(browser, "#events-table td.message")
    config = browser.find_element("id", "config").text
    assert "batch_size: 2" in config and "$HANDLERS/named.py" in config and str(site["state"]) not in config
    assert browser.find_elements("id", "cancel") == [] and browser.find_elements("id", "job-error") == []
    no_injection(browser)
    browser.save_screenshot(str(shots / "console_job_finished.png"))


def test_a_trajectory_with_tools_shows_turn_by_turn(site, browser, shots):
    """The samples card of a job with engine.environment: the prompt (a user's HTML shown as text), the model's
    call, the tool's result and the answer, with the reward; the step selector reloads another step."""
    from selenium.webdriver.support.ui import Select

    job = site["tools"]
    api = httpx.get(f"{site['url']}/console/api/jobs/{job}/samples", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert api["steps"] == [1, 2] and api["step"] == 2 and api["samples"]
    open_job(browser, site, job)
    samples = browser.find_elements("css selector", "#samples .sample")
    assert len(samples) == len(api["samples"])
    roles = [[e.get_attribute("textContent") for e in s.find_elements("css selector", ".turn .role")] for s in samples]
    # the taught model calls the calculator, reads 408 and answers (at temperature 1 nearly always)
    called = [i for i, r in enumerate(roles) if r[:4] == ["user", "assistant", "tool multiply", "assistant"]]
    assert called, roles
    first = samples[called[0]]
    assert first.find_element("css selector", ".tool-call").text == '→ multiply({"a": 12, "b": 34})'
    assert first.find_elements("css selector", ".turn-tool .content")[0].text == "408"
    assert float(first.find_element("css selector", ".score").text) == api["samples"][called[0]]["score"]
    prompts = {s.find_element("css selector", ".turn-user .content").text for s in samples}
    assert prompts <= {XSS_PROMPT, QUESTION}
    Select(browser.find_element("id", "sample-step")).select_by_value("1")
    wait(browser, lambda d: d.find_element("id", "samples").get_attribute("data-step") == "1")
    assert browser.find_elements("css selector", "#samples .sample")
    no_injection(browser)
    browser.execute_script("document.getElementById('samples').scrollIntoView()")
    browser.save_screenshot(str(shots / "console_job_tools.png"))


def test_failed_job_shows_its_error_as_text(site, browser, shots):
    open_job(browser, site, site["failed"])
    error = browser.find_element("id", "job-error").text
    assert XSS_ERROR in error and "The job failed" in error
    assert any(XSS_ERROR in m for m in texts(browser, "#events-table td.message"))
    no_injection(browser)
    browser.save_screenshot(str(shots / "console_job_failed.png"))


def test_running_job_updates_live_then_cancel_button(site, browser, shots):
    job = site["running"]
    open_job(browser, site, job)
    wait(browser, lambda d: int(d.execute_script("return document.body.dataset.points || '0'")) >= 1)
    first = int(browser.execute_script("return document.body.dataset.points"))
    assert browser.execute_script("return document.body.dataset.status") == "running"
    # no reload: the page polls and redraws as the trainer writes steps
    wait(browser, lambda d: int(d.execute_script("return document.body.dataset.points")) > first, timeout=90)
    assert browser.find_element("id", "updated").text.startswith("live")
    browser.save_screenshot(str(shots / "console_job_running.png"))
    status = lambda d: d.execute_script("return document.body.dataset.status")
    actions = set(browser.execute_script("return Array.from(C.actions)"))  # the job routes this server's API has
    assert "cancel" in actions and bool(browser.find_elements("id", "pause")) == ("pause" in actions)
    if "pause" in actions and "resume" in actions:  # running -> pausing -> paused, then back in the queue
        browser.find_element("id", "pause").click()
        wait(browser, lambda d: status(d) == "paused", timeout=90)
        assert site["client"].fine_tuning.jobs.retrieve(job).status == "paused"
        browser.find_element("id", "resume").click()
        wait(browser, lambda d: status(d) in ("queued", "running"), timeout=30)
    browser.find_element("id", "cancel").click()  # the first click arms it, the second confirms
    assert browser.find_element("id", "cancel").text == "Confirm: cancel job"
    assert site["client"].fine_tuning.jobs.retrieve(job).status != "cancelled"
    browser.find_element("id", "cancel").click()
    wait(browser, lambda d: d.execute_script("return document.body.dataset.status") == "cancelled", timeout=30)
    assert site["client"].fine_tuning.jobs.retrieve(job).status == "cancelled"
    wait(browser, lambda d: texts(d, "#events-table td.message")[:1] == ["Fine-tuning job cancelled"])
    assert browser.find_elements("id", "cancel") == []


def test_compare_job_with_pulled_run(site, browser, shots):
    browser.get(f"{site['url']}/console/compare?a=job:{site['done']}&b=run:pulled")
    wait(browser, lambda d: d.execute_script("return document.body.dataset.verdict"))
    assert browser.find_element("id", "verdict").text == "WITHIN tolerance (7/7 metrics)"
    rows = browser.find_elements("css selector", "#parity-table tbody tr")
    assert len(rows) == 7 and all(r.text.endswith("within") for r in rows)
    assert "aligned by step: steps 1-4 of 4" in browser.find_element("id", "overlap").text
    assert len(browser.find_elements("css selector", "#charts .chart canvas")) == 7
    no_injection(browser)
    browser.save_screenshot(str(shots / "console_compare.png"))
    # a bad pick is an error on the page, not a blank one
    browser.get(f"{site['url']}/console/compare?a=job:{site['done']}&b=run:nope")
    wait(browser, lambda d: d.find_elements("css selector", "#result .error-box"))
    assert "runs/nope" in browser.find_element("css selector", "#result .error-box").text
