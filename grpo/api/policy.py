"""What a client may decide on this server, and what only its operator decides (`grpo serve`'s flags).

A job body comes from whoever holds the key; the machine, its files, its network and its credentials are the
operator's. So:

- **Model.** A job's `model` must be one this server serves: a `--model NAME=PATH` name (a Bedrock id such as
  `qwen.qwen3-32b` may be one: `--model qwen.qwen3-32b=grpo:tiny-arith` makes the tiny model stand in for it,
  for training jobs and inference alike), or, on a server started without any `--model`, one of Bedrock's ids
  with its open-weights checkpoint. A path or hub id from a client is refused; so is `engine.model`.
- **Grader.** A local handler file must lie under `--handlers-dir` (`engine.handler` or the grader's function);
  so must a job's tools file (`engine.environment`).
  A Lambda ARN runs only as the operator allows: `--lambda ARN=FILE` runs a local file in its place, and
  `--invoke-lambdas` lets the server call deployed Lambdas with its own AWS credentials (at
  `--lambda-endpoint-url` when given). A client never names a URL (`engine.reward.endpoint_url`).
- **Engine.** The `engine` section is an allowlist of training knobs (learning rate, LoRA shape, sampling,
  clipping, KL, batching, checkpoint interval, reward batching...), each with bounds (`CLIENT_ENGINE`);
  paths, URLs, devices, precision, trackers that send data elsewhere and the handler environment's
  pass-through are the operator's (`OPERATOR_ENGINE` says why for each).
- **Devices.** A job asks for `engine.num_processes` (at most `--max-processes-per-job`, itself at most the
  server's devices); which devices, and the accelerate config file, are the operator's (`--devices`,
  `--accelerate-config`; grpo.api.devices).
- **Handler environment.** A handler gets what the operator sets or passes (`--handler-env NAME=VALUE`,
  `--handler-env NAME`), and from a client's `engine.reward.env` only the names the operator allows
  (`--client-env NAME`; none by default). Those names may not be endpoints (`*_URL`, `*_HOST`, `*_ENDPOINT`...:
  an endpoint is the operator's to set) nor a name the operator sets or passes (the operator's value always
  wins), and a client's value may not hold a URL. So no client value points a handler, and the credentials the
  operator gave it, at another address. A failing handler's error text can quote what its upstream answered;
  a client's job gets only its kind and trajectory ids (`engine.reward.error_detail: withheld`, the text in the
  run's reward_errors.log for the operator) unless the operator runs `--show-handler-errors`.
- **Resources.** `inference_max_tokens` is at most the server's max_tokens (32768, as for chat requests),
  reward calls in flight at most `--max-reward-concurrency`, a reward call's timeout at most Lambda's 900 s.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from grpo.algorithm_config import ALGORITHM_ALIASES
from grpo.api.errors import bad_request

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
# Environment variables a client may not set for a handler: the interpreter's and loader's own (they would
# run other code), locale/paths the worker relies on, and credentials (those are the operator's to pass).
RESERVED_ENV = re.compile(r"^(PATH|HOME|SHELL|USER|LOGNAME|TMPDIR|PYTHON.*|LD_.*|DYLD_.*|AWS_.*|GRPO_.*|"
                          r"SSL_.*|REQUESTS_CA_BUNDLE|CURL_CA_BUNDLE|.*_PROXY|HF_.*|TRANSFORMERS_.*|"
                          r"CUDA_.*|VIRTUAL_ENV|BASH_ENV|ENV)$", re.IGNORECASE)
# Names that say a variable holds an address: never a client's to set, whatever --client-env allows.
ENDPOINT_ENV = re.compile(r"(URL|URI|ENDPOINT|HOST|ADDR|ADDRESS|SERVER|PORT|SOCKET|DSN|DOMAIN|BUCKET|REGION)",
                          re.IGNORECASE)
URL_VALUE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://|^//|^\\\\")
NUMBER_CAP = 1e6  # any number in a knob section without a bound of its own

# A client's engine section: a value is (low, high) inclusive bounds, a set of allowed values, a dict for a
# section, ANY for "as the config validates it", NAMES for a short list of module/parameter names.
ANY, NAMES, ENV = "any", "names", "env"
# engine.algorithm (grpo.algorithm_config): every key with its bounds; names are checked against the registries
# and presets by the config itself (ANY). The dynamic-sampling round cap bounds the generation a step may do.
CLIENT_ALGORITHM: dict = {
    "preset": ANY, "adv_estimator": ANY, "policy_loss": ANY, "norm_adv_by_std": ANY,
    "clip_ratio_low": (0, 10.0), "clip_ratio_high": (0, 10.0), "clip_ratio_c": (1, 100.0),
    "kl_coef": (0, 100.0), "kl_penalty": ANY, "entropy_coef": (-100.0, 100.0), "loss_agg_mode": ANY,
    "ppo_epochs": (1, 16), "mini_batch_size": (1, 512), "micro_batch_size": (1, 1024), "max_grad_norm": (0, NUMBER_CAP),
    "gamma": (0, 1.0), "tau_pos": (0, 100.0), "tau_neg": (0, 100.0), "clip_cov_ratio": (0, 1.0),
    "clip_cov_lb": (-1000.0, 1000.0), "clip_cov_ub": (-1000.0, 1000.0), "kl_cov_ratio": (0, 1.0),
    "ppo_kl_coef": (0, 100.0), "dro_beta": (0, 100.0),
    "filter_groups": {"enable": ANY, "metric": ANY, "max_num_gen_batches": (1, 20)},
    "overlong_buffer": {"enable": ANY, "len": (1, 32768), "penalty_factor": (0, 100.0), "log": ANY},
}
CLIENT_ENGINE: dict = {
    "seed": (0, 2**32 - 1), "base_learning_rate": (0, 1.0), "lr_warmup_steps": (0, 100_000),
    "weight_decay": (0, 1.0), "temperature": (0, 10.0), "top_p": ANY, "eval_temperature": (0, 10.0),
    "ignore_eos": ANY, **{k: CLIENT_ALGORITHM[k] for k in ALGORITHM_ALIASES}, "gradient_checkpointing": ANY,
    "lora": {"rank": (1, 1024), "alpha": (1, 4096), "dropout": ANY, "target_modules": NAMES,
             "target_parameters": NAMES},
    "checkpoint_interval": (1, 100_000), "num_processes": "max_processes_per_job", "eval_max_records": (1, 20_000), "early_stopping_patience": (1, 1000),
    "early_stopping_min_delta": (0, NUMBER_CAP), "log_samples": (0, 64), "log_with": {"none", "tensorboard"},
    "reward": {"batch_size": (1, 1024), "concurrency": "max_reward_concurrency", "timeout_s": (0, 900.0),
               "on_failure": ANY, "env": ENV},
    "rollout": {"backend": ANY, "tis": ANY, "tis_cap": (0, 100.0), "tool_choice": ANY, "parallel_tool_calls": ANY,
                "max_turns": (1, 64),
                "tool_timeout_s": (0, 900.0), "tool_concurrency": "max_reward_concurrency"},
    "environment": ANY,  # a tools file under --handlers-dir (checked by jobs.resolve_handler), like handler
    "health": "knobs", "algorithm": CLIENT_ALGORITHM,
    "handler": ANY,  # a local file under --handlers-dir (checked by jobs.resolve_handler); an ARN: see above
}
OPERATOR_ENGINE = {
    "model": "a job trains the model this server serves under the job's `model` (grpo serve --model NAME=PATH)",
    "dtype": "precision is the operator's (memory of this machine)",
    "load_in_4bit": "quantization is the operator's (memory of this machine)",
    "attn_implementation": "attention kernels are the operator's (what this machine has installed)",
    "cpu_linear": "CPU kernels are the operator's (what this machine's processor runs best)",
    "reward.endpoint_url": "this server sends requests only where its operator says (--lambda-endpoint-url)",
    "reward.pass_env": "passing this server's environment to handlers is the operator's (--handler-env NAME)",
    "reward.error_detail": "whether a handler's error text reaches a client is the operator's "
                           "(grpo serve --show-handler-errors)",
    "rollout.gpu_memory_utilization": "GPU memory is the operator's",
    "log_with": "trackers that send data off this machine are the operator's; a client may choose none or "
                "tensorboard",
}
HYPERPARAMETER_BOUNDS = {"batch_size": (1, 512), "max_prompt_length": (1, 131_072),
                         "learning_rate_multiplier": (0, 100.0)}


@dataclass
class ServerPolicy:
    """The operator's decisions (`grpo serve` flags); `check_job` applies them to a client's job body."""

    handlers_dir: Path = Path("rewards")
    base_models: dict[str, str] = field(default_factory=dict)   # --model NAME=PATH
    lambdas: dict[str, str] = field(default_factory=dict)       # --lambda ARN=FILE
    invoke_lambdas: bool = False                                # --invoke-lambdas
    lambda_endpoint_url: str | None = None                      # --lambda-endpoint-url
    handler_env: dict[str, str] = field(default_factory=dict)   # --handler-env NAME=VALUE
    handler_pass_env: list[str] = field(default_factory=list)   # --handler-env NAME
    client_env: list[str] = field(default_factory=list)         # --client-env NAME: what a client may set
    show_handler_errors: bool = False                           # --show-handler-errors
    max_tokens: int = 32768
    max_reward_concurrency: int = 8
    max_processes_per_job: int = 1                              # --max-processes-per-job (at most the devices)
    dtype: str = "auto"                                         # --dtype: jobs' engine.dtype and inference

    def served_models(self) -> dict[str, str]:
        """Model id -> what runs locally: the --model names, or Bedrock's ids when none was given."""
        from grpo.config import BEDROCK_MODEL_IDS

        return dict(self.base_models) if self.base_models else dict(BEDROCK_MODEL_IDS)

    def local_model(self, model: str, param: str = "model") -> str:
        served = self.served_models()
        if model not in served:
            raise bad_request(f"{param}: {_short(model)} is not a model this server serves; it serves "
                              f"{', '.join(sorted(served)) or 'none'} (its operator chooses them: grpo serve "
                              "--model NAME=PATH)", param, code="model_not_found")
        return served[model]


def check_client_env_names(names: list[str], operator_names: list[str]) -> None:
    """The operator's --client-env names: ValueError for a name a client must never set (interpreter, path,
    credential and endpoint variables) or one the operator sets or passes itself (its value wins)."""
    for name in names:
        if not ENV_NAME.match(name) or RESERVED_ENV.match(name):
            raise ValueError(f"--client-env {name}: interpreter, path, proxy and credential variables are never a "
                             "client's to set")
        if ENDPOINT_ENV.search(name):
            raise ValueError(f"--client-env {name}: it names an address (URL, host, endpoint...), which only the "
                             f"operator sets: --handler-env {name}=VALUE")
        if name in operator_names:
            raise ValueError(f"--client-env {name}: --handler-env sets or passes it already (the operator's value "
                             "wins; a client may not replace it)")


def _short(value, n: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= n else text[:n] + "...'"


def _check_value(path: str, rule, value, policy: ServerPolicy) -> None:
    if rule == ANY or value is None:
        return
    if rule == "max_reward_concurrency":
        rule = (1, policy.max_reward_concurrency)
    if rule == "max_processes_per_job":
        rule = (1, policy.max_processes_per_job)
    if rule == "knobs":
        return _check_numbers(path, value)
    if rule == NAMES:
        items = [value] if isinstance(value, str) else value
        if not (isinstance(items, list) and len(items) <= 64 and all(
                isinstance(s, str) and 0 < len(s) <= 128 and s.isprintable() for s in items)):
            raise bad_request(f"engine.{path}: expected up to 64 module or parameter names", f"engine.{path}")
        return
    if rule == ENV:
        if not isinstance(value, dict):
            raise bad_request(f"engine.{path}: expected an object of NAME: value", f"engine.{path}")
        for name, v in value.items():
            if name not in policy.client_env:
                allowed = ", ".join(policy.client_env) or "none"
                raise bad_request(f"engine.{path}.{_short(name, 40)}: not a variable this server lets a client set "
                                  f"for its handlers (allowed: {allowed}; the operator allows names with grpo serve "
                                  "--client-env NAME, and sets the rest with --handler-env)", f"engine.{path}")
            if not isinstance(v, str) or len(v) > 4096 or "\0" in v:
                raise bad_request(f"engine.{path}.{name}: expected a string of at most 4096 characters",
                                  f"engine.{path}")
            if URL_VALUE.search(v):
                raise bad_request(f"engine.{path}.{name}: a client's value may not hold a URL (where a handler "
                                  "sends requests is the operator's: grpo serve --handler-env NAME=VALUE)",
                                  f"engine.{path}")
        return
    if isinstance(rule, set):
        bad = [v for v in (value if isinstance(value, list) else [value]) if v not in rule]
        if bad:
            raise bad_request(f"engine.{path}: {_short(bad[0])} is not allowed from a client here; allowed: "
                              f"{', '.join(sorted(rule))} ({OPERATOR_ENGINE.get(path, 'the operator decides')})",
                              f"engine.{path}")
        return
    lo, hi = rule
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not lo <= value <= hi:
        raise bad_request(f"engine.{path}: {_short(value)} is outside this server's bounds [{lo:g}, {hi:g}]",
                          f"engine.{path}")


def _check_numbers(path: str, value) -> None:
    """Every number in a knob section within +-NUMBER_CAP (no unbounded window or count)."""
    stack = [(path, value)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, dict):
            stack += [(f"{where}.{k}", x) for k, x in v.items()]
        elif isinstance(v, list):
            stack += [(f"{where}[{i}]", x) for i, x in enumerate(v)]
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and not (
                math.isfinite(v) and abs(v) <= NUMBER_CAP):
            raise bad_request(f"engine.{where}: {_short(v)} is outside this server's bounds [-1e6, 1e6]",
                              f"engine.{where}")


def _default(path: str):
    """EngineConfig's default for a dotted field path (what a full dump of an untouched section holds)."""
    from grpo.config import EngineConfig

    value = EngineConfig().model_dump(mode="json")
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def check_engine(raw_engine, policy: ServerPolicy, rules: dict = CLIENT_ENGINE, prefix: str = "") -> None:
    """A client's engine section against the allowlist: operator-only fields, unknown fields and values out of
    bounds are a 400 naming the field."""
    if raw_engine is None:
        return
    if not isinstance(raw_engine, dict):
        raise bad_request(f"engine{'.' + prefix[:-1] if prefix else ''}: expected an object", "engine")
    for key, value in raw_engine.items():
        path = f"{prefix}{key}"
        if path in OPERATOR_ENGINE and path != "log_with":
            if path == "model" or value == _default(path):  # model: jobs.validate_body compares it to the served one
                continue  # a client that sends the whole section (grpo submit --with-engine) sends the defaults too
            raise bad_request(f"engine.{path}: set by this server's operator, not by a client "
                              f"({OPERATOR_ENGINE[path]})", f"engine.{path}")
        rule = rules.get(key)
        if rule is None:
            raise bad_request(f"engine.{path}: not a setting a client may send to this server; allowed: "
                              f"{', '.join(sorted(rules))}", f"engine.{path}")
        if isinstance(rule, dict):
            check_engine(value, policy, rule, f"{path}.")
        else:
            _check_value(path, rule, value, policy)


def check_hyperparameters(hyper, policy: ServerPolicy) -> None:
    """Bounds Bedrock's own schema leaves open: tokens sampled per response (the server's max_tokens),
    prompts per step (the native API's 512), prompt length."""
    param = "method.reinforcement.hyperparameters"
    bounds = dict(HYPERPARAMETER_BOUNDS, inference_max_tokens=(1, policy.max_tokens))
    for name, (lo, hi) in bounds.items():
        v = getattr(hyper, name, None)
        if v is not None and not lo <= v <= hi:
            raise bad_request(f"{param}.{name}: {v!r} is outside this server's bounds [{lo:g}, {hi:g}]",
                              f"{param}.{name}")
