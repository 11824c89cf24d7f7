"""`grpo serve`: a local OpenAI-compatible server for files, fine-tuning jobs and inference.

It speaks the subset of OpenAI's API that Bedrock's OpenAI-compatible RFT path uses (BEDROCK_RFT.md
section 3), with OpenAI's object shapes, cursor pagination (`limit`, `after`, `has_more`) and error
shape `{"error": {"message", "type", "param", "code"}}`, so the real `openai` package drives it.

Who decides what (`policy`): a job body from a key holder names a model the server serves (`--model
NAME=PATH`, a Bedrock id among them; without any, Bedrock's ids), a grader file under `--handlers-dir` or an
ARN the operator mapped (`--lambda ARN=FILE`) or allowed (`--invoke-lambdas`), and training knobs from the
`engine` allowlist within bounds. Paths, URLs, devices, precision, other trackers and the handlers' pass-through
environment are the operator's; request bodies are bounded as they arrive (`limits`). docs/server.md has
the table.

Modules: `app` (FastAPI routes, auth, errors), `policy` (the operator's decisions applied to a job body),
`limits` (request size, JSON depth), `store` (SQLite state), `jobs` (validation of the job
body, the worker that runs `grpo train` subprocesses, events and checkpoints), `runner` (the trainer
subprocess entry point that dies with its server), `inference` (model cache and token streaming),
`chat` (chat.completions and responses objects and their event streams), `console` and `console_runs`
(the browser console at /console/: its sign-in, pages and the run data they chart; docs/console.md).

Ids (chosen once, here):

| object | format |
| --- | --- |
| file | `file-<24 hex>` |
| fine-tuning job | `ftjob-<24 hex>` |
| job event | `ftevent-<24 hex>` (the trainer's own ids for its events) |
| checkpoint | `ftckpt-<24 hex>` (derived from job id and step: stable across restarts) |
| fine-tuned model | `ft:<job's model>:grpo:<job id>` (the adapter of the job's last checkpoint) |
| checkpoint model | `ft:<job's model>:grpo:<job id>:ckpt-step-<N>` |
| chat completion / response | `chatcmpl-<24 hex>` / `resp_<24 hex>` |

State directory: `server.sqlite3` (files, jobs, events), `files/<file-id>.jsonl` (`.upload-*` while one
arrives; leftovers of a killed server are removed at start), and
`jobs/<job-id>/` holding `job.yaml` (the validated body with file ids resolved to paths),
`training.jsonl`/`validation.jsonl` (the job's own links to the uploaded files), `train.log` and
`run/` (the trainer's run directory: metrics.jsonl, events.jsonl, checkpoints/step-NNNNNN/adapter).
"""
