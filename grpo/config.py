"""The job config: the body of Bedrock's `fine_tuning.jobs.create` plus a local-only `engine:` section.

One YAML file runs locally as it is (`grpo train job.yaml`) and is submitted to Bedrock with `engine`
stripped. Relative paths in the file are taken relative to the current directory, as a command line
tool would. Every default that Bedrock does not publish lives in `EngineConfig` below, with its reason
beside it; docs/job_file.md's defaults table is the same list, and its key tables are generated from these models.
"""

from __future__ import annotations

import difflib
import math
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from grpo.algorithm_config import ALGORITHM_ALIASES, AlgorithmConfig, flat_aliases, lift_algorithm_aliases
from grpo.errors import UserError
from grpo.health_thresholds import HealthThresholds

# Bedrock model ids on the OpenAI-compatible path -> the open-weights checkpoints they serve.
BEDROCK_MODEL_IDS = {
    "openai.gpt-oss-20b": "openai/gpt-oss-20b",
    "qwen.qwen3-32b": "Qwen/Qwen3-32B",
}
# The embedded default: a tiny Qwen3-architecture model the project pretrains itself (grpo.models.tiny).
TINY_MODEL = "grpo:tiny-arith"
TINY_TOOLS_MODEL = "grpo:tiny-tools"  # the tool-calling tiny model (docs/tools.md)


def local_model_id(model: str) -> str:
    """What runs locally for `model`: the open-weights checkpoint behind a Bedrock model id, else `model`."""
    return BEDROCK_MODEL_IDS.get(model, model)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Hyperparameters(_Strict):
    """Bedrock's names: the OpenAI-compatible three, and the native API's in snake case."""

    n_epochs: int = Field(1, ge=1, le=50, description="passes over the training data (native epochCount 1-50)")
    batch_size: int = Field(16, ge=1, description="prompts per step (native batchSize 16-512)")
    learning_rate_multiplier: float = Field(1.0, gt=0, description="scales engine.base_learning_rate")
    learning_rate: float | None = Field(None, ge=1e-7, le=1e-3, description="native learningRate; overrides base x multiplier")
    training_sample_per_prompt: int = Field(8, ge=2, le=16, description="group size (native 2-16)")
    max_prompt_length: int = Field(4096, ge=1, description="prompts longer than this (tokens) are filtered out")
    inference_max_tokens: int = Field(1024, ge=1, description="max tokens sampled per response")
    reasoning_effort: Literal["low", "medium", "high"] = Field(
        "low", description="Qwen3: thinking off for low; GPT-OSS: harmony's \"Reasoning: low\"")
    eval_interval: int | None = Field(None, ge=1, le=100, description="steps between validations; auto: min(10, records/batch)")
    early_stopping: bool = Field(True, description="on by default, as on Bedrock; rule in engine.early_stopping_*")


class LambdaGrader(_Strict):
    function: str = Field(..., description="a Lambda ARN, or locally a handler path (file.py or file.py:function)")


class Grader(_Strict):
    type: Literal["lambda"] = "lambda"
    lambda_: LambdaGrader = Field(..., alias="lambda")
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Reinforcement(_Strict):
    grader: Grader
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(_Strict):
    type: Literal["reinforcement"] = "reinforcement"
    reinforcement: Reinforcement


class LoraConfig(_Strict):
    rank: int = Field(32, ge=1, description="AWS: rank 32")
    alpha: int = Field(64, ge=1, description="2 x rank, the common choice; Bedrock does not publish it")
    dropout: float = Field(0.0, ge=0, lt=1, description="0: dropout would make old and new log-probs differ on-policy")
    target_modules: list[str] | str = Field("all-linear", description="attention and MLP projections")
    target_parameters: list[str] | None = Field(None, description="LoRA on weights that are parameters, not Linear modules (peft target_parameters); default: GPT-OSS's MoE experts, none elsewhere; [] for none")


class RewardRunnerConfig(_Strict):
    batch_size: int = Field(64, ge=1, description="trajectories per handler call")
    concurrency: int = Field(2, ge=1, description="handler calls in flight at once")
    timeout_s: float = Field(300.0, gt=0, le=900, description="per call, like the AWS sample Lambdas (Lambda's maximum: 900)")
    on_failure: Literal["fail", "skip"] = Field("fail", description="fail the step, or drop failed trajectories")
    endpoint_url: str | None = Field(None, description="Lambda endpoint for ARN graders (emulators, LocalStack)")
    env: dict[str, str] = Field(default_factory=dict, description="environment variables for local handlers (the Lambda's configuration)")
    pass_env: list[str] = Field(default_factory=list, description="variables passed from this process's environment to local handlers, e.g. AWS credentials for a judge calling Bedrock (grpo.reward.workers.handler_env)")
    error_detail: Literal["full", "withheld"] = Field("full", description="full: a failing handler's own error text is quoted in the step's error; withheld: only its kind and trajectory ids, the text going to <run>/reward_errors.log (what grpo serve sets for its clients' jobs unless --show-handler-errors)")


class RolloutConfig(_Strict):
    """Where responses are sampled (grpo.rollout.samplers) and how a sampler that is not the trained policy is corrected."""

    backend: Literal["transformers", "continuous", "vllm"] = Field(
        "transformers", description="transformers: the trained policy samples itself (exact, the default); "
        "continuous: transformers' continuous batching (paged KV cache, CUDA graphs); vllm: colocated vLLM (extra)")
    tis: Literal["token", "sequence", "off"] = Field(
        "token", description="truncated importance sampling for samplers with their own numerics (continuous, vllm); verl's rollout_is")
    tis_cap: float = Field(2.0, gt=0, description="the truncation C of min(pi_old / pi_sampler, C): Yao et al. and verl")
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="vllm: share of GPU memory for weights + KV cache")
    max_turns: int = Field(5, ge=1, description="engine.environment: assistant turns per trajectory (sample -> call "
                           "tools -> sample ...); the token budget is inference_max_tokens for the whole trajectory")
    tool_timeout_s: float = Field(30.0, gt=0, le=900, description="engine.environment: seconds one tool call may take "
                                  "before its worker is killed and the model reads an error")
    tool_concurrency: int = Field(2, ge=1, description="engine.environment: tool worker processes (calls in parallel)")
    tool_choice: str = Field(
        "auto", description="records with tools: auto (sampled freely), required (every response is a call of one "
        "of the record's tools) or a function name (a call of it, where the record has it); required and a name "
        "constrain decoding to the template's call format with the schema's arguments (grpo.rollout.constrain, "
        "needs llguidance: pip install 'grpo[tools]'; transformers backend)")
    parallel_tool_calls: bool = Field(
        True, description="with tool_choice required: a response may hold several calls (OpenAI's default); false: "
        "exactly one call, then the response ends (a task that expects one call: no tokens spent on a second, "
        "truncated one)")

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v: str) -> str:
        import re

        if v in ("auto", "required") or re.fullmatch(r"[A-Za-z0-9_-]{1,64}", v):
            return v
        raise ValueError(f"expected 'auto', 'required' or a function name (letters, digits, '_', '-'), got {v!r}")


class EngineConfig(_Strict):
    """Local-only settings. Each default is one Bedrock does not publish; the reason is beside it."""

    model: str | None = Field(None, description="local model path or hub id, overriding the Bedrock id mapping")
    handler: str | None = Field(None, description="local handler run in place of the grader's ARN")
    environment: str | None = Field(None, description="a .py file of plain Python functions, the tools of multi-turn "
                                    "rollouts (docs/tools.md); run in worker processes with engine.reward's env")
    seed: int = Field(0, description="prompt order, sampling and the adapter's start: a run repeats exactly")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights' dtype; auto: bf16 on a GPU, fp32 on the CPU")
    base_learning_rate: float = Field(1e-4, gt=0, description="AWS best practice for LoRA: 1e-4")
    lr_warmup_steps: int = Field(0, ge=0, description="linear warm-up over training steps (the schedule steps once "
                                 "per step, however many mini-batches, as verl's worker); Bedrock publishes none")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's; 0: the update is the loss's alone (Bedrock publishes none)")
    temperature: float = Field(1.0, gt=0, description="verl's rollout default; the policy's own distribution")
    top_p: float = Field(1.0, gt=0, le=1, description="1.0: the full distribution (top-k off too), so the update's "
                         "log-probs describe exactly what was sampled")
    ignore_eos: bool = Field(False, description="benchmarks: every response is inference_max_tokens long; end tokens do not stop it")
    eval_temperature: float | None = Field(None, description="validation sampling; default: the training temperature")
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig,
                                       description="the GRPO update: estimator, loss, KL, batch sizes (flat engine.* aliases)")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="the adapter: rank, alpha, dropout, targets")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass: less memory, "
                                         "more time; the GPU configs turn it on to fit")
    load_in_4bit: bool = Field(False, description="QLoRA: the base's linear layers in 4-bit NF4 (bitsandbytes); Qwen3-32B on one 80 GB GPU")
    attn_implementation: str | None = Field(None, description="transformers attention kernel; default the model's own (SDPA for Qwen3; eager for GPT-OSS, whose attention sinks SDPA lacks)")
    cpu_linear: Literal["onednn", "aten"] = Field("onednn", description="frozen float32 Linear layers on the CPU: "
                                                  "oneDNN (2-3x MKL's speed on AMD CPUs) or PyTorch's default")
    num_processes: int = Field(1, ge=1, description="grpo serve: processes (one device each) the server launches "
                               "this job with under accelerate launch; grpo train runs as it was launched")
    checkpoint_interval: int = Field(50, ge=1, description="steps between checkpoints (and one at the end)")
    eval_max_records: int | None = Field(None, ge=1, description="cap on validation prompts per evaluation")
    early_stopping_patience: int = Field(5, ge=1, description="evaluations without improvement before stopping")
    early_stopping_min_delta: float = Field(0.01, ge=0, description="improvement of val reward that counts")
    reward: RewardRunnerConfig = Field(default_factory=RewardRunnerConfig,
                                       description="how the reward handler is called: batches, concurrency, failures")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig,
                                   description="where responses are sampled, and the correction for another sampler")
    log_samples: int = Field(4, ge=0, description="sampled responses per step written to <run>/samples.jsonl")
    log_with: list[str] = Field(default_factory=lambda: ["tensorboard"], description="accelerate trackers")
    health: HealthThresholds = Field(default_factory=HealthThresholds, description="training-health alarms: docs/health.md")

    def __getattr__(self, name: str) -> Any:  # engine.kl_coef reads engine.algorithm.kl_coef (the aliases)
        if name in ALGORITHM_ALIASES:
            return getattr(self.algorithm, name)
        return super().__getattr__(name)

    @model_validator(mode="after")
    def _backend_fits_the_base(self) -> "EngineConfig":
        if self.rollout.backend == "vllm" and self.load_in_4bit:
            raise ValueError("rollout.backend=vllm cannot take its weights from a 4-bit (load_in_4bit) base: vLLM "
                             "is synced with merged bf16 weights; use the transformers or continuous backend with QLoRA")
        if self.environment and self.rollout.tool_choice != "auto":
            raise ValueError(f"rollout.tool_choice={self.rollout.tool_choice!r} constrains single-turn sampling; with "
                             "engine.environment (tools that run) leave it at auto")
        return self

    @model_validator(mode="after")
    def _environment_backend(self) -> "EngineConfig":
        if self.environment and self.rollout.backend != "transformers":
            raise ValueError(f"engine.environment (multi-turn rollouts with tools) runs on the transformers rollout "
                             f"backend, not {self.rollout.backend}")
        return self

    @model_validator(mode="before")
    @classmethod
    def _lift_algorithm_aliases(cls, data: Any) -> Any:
        return lift_algorithm_aliases(data)

    @field_validator("log_with")
    @classmethod
    def _known_trackers(cls, v: list[str]) -> list[str]:
        from accelerate.utils import LoggerType  # imports torch: only when the field is given

        known = ["none", *LoggerType.list()]
        bad = [t for t in v if t not in known]
        if bad:
            raise ValueError(f"unknown tracker {', '.join(map(repr, bad))}; known: {', '.join(known)}")
        return v


class JobConfig(_Strict):
    model: str
    training_file: str
    validation_file: str | None = None
    method: Method
    engine: EngineConfig = Field(default_factory=EngineConfig)
    seed: int | None = Field(None, description="OpenAI's job field; same as engine.seed")

    @field_validator("model")
    @classmethod
    def _model_non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a non-empty model id or path")
        return v

    @model_validator(mode="after")
    def _sizes(self) -> "JobConfig":
        e, h = self.engine, self.hyperparameters
        mini = e.algorithm.mini_batch_size
        if mini is not None and h.batch_size % mini:
            raise ValueError(f"engine.algorithm.mini_batch_size ({mini}) must divide hyperparameters.batch_size ({h.batch_size})")
        ob = e.algorithm.overlong_buffer
        if ob.enable and ob.len is not None and ob.len >= h.inference_max_tokens:
            raise ValueError(f"engine.algorithm.overlong_buffer.len ({ob.len}) must be below "
                             f"hyperparameters.inference_max_tokens ({h.inference_max_tokens})")
        return self

    def overlong_buffer_len(self) -> int:
        """The overlong buffer in tokens: engine.algorithm.overlong_buffer.len, default a fifth of
        inference_max_tokens (DAPO's 4096 of 20480), at least 1."""
        ob = self.engine.algorithm.overlong_buffer
        return ob.len if ob.len is not None else max(1, self.hyperparameters.inference_max_tokens // 5)

    # -- convenient views ------------------------------------------------------------------
    @property
    def hyperparameters(self) -> Hyperparameters:
        return self.method.reinforcement.hyperparameters

    @property
    def grader_function(self) -> str:
        return self.method.reinforcement.grader.lambda_.function

    @property
    def handler(self) -> str:
        """What scores locally: engine.handler if set, else the grader's function (ARN or path)."""
        return self.engine.handler or self.grader_function

    @property
    def local_model(self) -> str:
        return self.engine.model or local_model_id(self.model)

    @property
    def learning_rate(self) -> float:
        h = self.hyperparameters
        return h.learning_rate if h.learning_rate is not None else self.engine.base_learning_rate * h.learning_rate_multiplier

    @property
    def run_seed(self) -> int:
        return self.seed if self.seed is not None else self.engine.seed

    def mini_batch_prompts(self) -> int:
        return self.engine.algorithm.mini_batch_size or self.hyperparameters.batch_size

    def eval_interval(self, n_records: int) -> int:
        h = self.hyperparameters
        return h.eval_interval or max(1, min(10, n_records // h.batch_size))

    def total_steps(self, n_records: int) -> int:
        h = self.hyperparameters
        return math.ceil(n_records / h.batch_size) * h.n_epochs

    def bedrock_body(self) -> dict[str, Any]:
        """The body sent to Bedrock: everything but `engine`."""
        return self.model_dump(by_alias=True, exclude={"engine"}, exclude_none=True)

    def warnings(self) -> list[str]:
        """Values Bedrock may reject, where AWS's own sources disagree (so not errors)."""
        h, out = self.hyperparameters, []
        if not 16 <= h.batch_size <= 512:
            out.append(f"hyperparameters.batch_size={h.batch_size} is outside the native API's 16-512 "
                       "(AWS's own GSM8K example uses 4 on the OpenAI-compatible path)")
        if h.learning_rate_multiplier > 1.0:
            out.append(f"hyperparameters.learning_rate_multiplier={h.learning_rate_multiplier}: AWS recommends below 1.0 for stability")
        if self.local_model == TINY_MODEL and self.model in BEDROCK_MODEL_IDS:
            pass  # the quickstart: Bedrock trains the real model, locally the tiny one stands in
        return out


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if nxt is None:
            nxt = cur[p] = {}
        if not isinstance(nxt, dict):
            raise UserError(f"--set {key}: '{p}' is not a section")
        cur = nxt
    cur[parts[-1]] = value


def _drop_other_spelling(raw: dict, parts: list[str]) -> None:
    """`--set engine.kl_coef=X` replaces a file's engine.algorithm.kl_coef, and the other way round."""
    engine = raw.get("engine")
    if not isinstance(engine, dict):
        return
    if len(parts) == 2 and parts[0] == "engine" and parts[1] in ALGORITHM_ALIASES:
        algo = engine.get("algorithm")
        if isinstance(algo, dict):
            algo.pop(parts[1], None)
    elif len(parts) == 3 and parts[:2] == ["engine", "algorithm"] and parts[2] in ALGORITHM_ALIASES:
        engine.pop(parts[2], None)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`--set a.b.c=value`: the value is read as YAML (numbers, booleans, lists)."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. --set method.reinforcement.hyperparameters.batch_size=8")
        key, _, text = item.partition("=")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        _drop_other_spelling(raw, key.strip().split("."))
        _set_dotted(raw, key.strip(), value)
    return raw


def _known_fields(model: type[BaseModel], loc: tuple) -> list[str]:
    cur: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or not (isinstance(cur, type) and issubclass(cur, BaseModel)):
            return []
        field = cur.model_fields.get(part) or next(
            (f for f in cur.model_fields.values() if f.alias == part), None)
        if field is None:
            return []
        cur = field.annotation
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return [f.alias or n for n, f in cur.model_fields.items()] + (list(ALGORITHM_ALIASES) if cur is EngineConfig else [])
    return []


def yaml_key_lines(text: str) -> dict[tuple, int]:
    """The 1-based line of every mapping key and list item of a YAML document, by path (for errors)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    out: dict[tuple, int] = {}

    def walk(node, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode):
                    out[path + (k.value,)] = k.start_mark.line + 1
                    walk(v, path + (k.value,))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                out[path + (i,)] = v.start_mark.line + 1
                walk(v, path + (i,))

    walk(root, ())
    return out


def format_validation_error(source: str, err: ValidationError, key_lines: dict[tuple, int | str] | None = None,
                            flat: set[str] = frozenset()) -> str:
    """One `FILE:LINE: dotted.field: problem` line per error (`--set` for values given on the command line);
    `flat`: the algorithm keys the body wrote as flat aliases (flat_aliases), named as written."""
    lines = []
    for e in err.errors():
        path = tuple(e["loc"])
        if path[:2] == ("engine", "algorithm") and len(path) > 2 and path[2] in flat:
            path = ("engine", *path[2:])  # written as the flat alias: named as written
        line = next((key_lines[path[:i]] for i in range(len(path), 0, -1) if key_lines and path[:i] in key_lines), None)
        where = f"{source}:{line}" if isinstance(line, int) else (line or source)
        loc = ".".join(str(p) for p in path) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            known = _known_fields(JobConfig, tuple(e["loc"]))
            close = difflib.get_close_matches(str(e["loc"][-1]), known, n=1)
            msg = "unknown field" + (f" (did you mean '{close[0]}'?)" if close else "")
            if known:
                msg += f"; known: {', '.join(known)}"
        lines.append(f"{where}: {loc}: {msg}")
    return "invalid job config:\n" + "\n".join(lines)


def parse_config(raw: Any, source: str = "<config>", key_lines: dict[tuple, int | str] | None = None) -> JobConfig:
    if not isinstance(raw, dict):
        raise UserError(f"{source}: the config must be a mapping (model, training_file, method, engine)")
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as e:
        raise UserError(format_validation_error(source, e, key_lines, flat_aliases(raw))) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> JobConfig:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
        raw = yaml.safe_load(text)
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if overrides and isinstance(raw, dict):  # anything else gets parse_config's "must be a mapping"
        raw = apply_overrides(raw, overrides)
    key_lines: dict[tuple, int | str] = yaml_key_lines(text)
    for item in overrides or []:
        key_lines[tuple(item.partition("=")[0].strip().split("."))] = "--set"
    return parse_config(raw, str(path), key_lines)


def print_warnings(cfg: JobConfig, stream=sys.stderr) -> None:
    for w in cfg.warnings():
        print(f"warning: {w}", file=stream)
