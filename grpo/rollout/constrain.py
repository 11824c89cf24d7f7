"""Constrained decoding of tool calls: with `tool_choice` `required` or a named function, every sampled token is
masked to what a grammar of the model's own call format allows, so the response is always a call whose
arguments are a JSON object matching the function's schema (what OpenAI's API guarantees for these choices).

The grammar (llguidance's Lark dialect, `%json` for the schema) spells the call the way the chat template writes
one (grpo.rollout.tools):

- `qwen3` / `chatml_fallback` (hermes): `<tool_call>\\n{"name": "NAME", "arguments": {...}}\\n</tool_call>`, one
  call, or one or more separated by a newline when parallel calls are allowed, then the end token. With
  thinking on (Qwen3 at reasoning effort medium/high) a `<think>...</think>` block may come first.
- `harmony` (GPT-OSS; the generation prompt ends with `<|start|>assistant`): ` to=functions.NAME<|channel|>
  commentary json<|message|>{...}<|call|>`, optionally after an analysis message when thinking is on. One call
  (a harmony message has one recipient).

JSON is written as `json.dumps` writes it (`", "` and `": "`, no free whitespace), so a model cannot pad
forever. A token the template gives as one added token (`<think>`, real Qwen3's `<tool_call>`) is matched as
that token, not spelled in bytes.

The library is llguidance (chosen by measurement against xgrammar and outlines-core: docs/tools_api.md). It is
an optional dependency (`pip install 'grpo[tools]'`): imported only when a constraint is asked for, and its
absence is then a clear error, never an import failure elsewhere.

Use: `constraint = ToolConstraints.for_tokenizer(tok, vocab_size).new(grammar)` per row; per decode step
`mask_logits_(logits, rows)` before sampling and `row.advance(token)` after; `GrammarLogitsProcessor` does both
inside transformers' `generate`.
"""

from __future__ import annotations

import json
import re
import threading

from grpo.errors import UserError

INSTALL_HINT = "pip install 'grpo[tools]' (or: pip install llguidance)"
#: OpenAI's rule for function names (and what a grammar literal can hold safely).
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: `json.dumps`'s separators: the hermes and harmony calls the templates render use them.
_COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class ConstraintUnavailable(UserError):
    """llguidance is not installed, and a constraint was asked for."""


def _llguidance():
    try:
        import llguidance
        import llguidance.hf
    except ImportError as e:
        raise ConstraintUnavailable(f"constrained tool calls (tool_choice 'required' or a named function) need the "
                                    f"llguidance package, which is not installed here ({e}): {INSTALL_HINT}") from None
    return llguidance


def available() -> bool:
    try:
        _llguidance()
    except ConstraintUnavailable:
        return False
    return True


# -- tool_choice ---------------------------------------------------------------------------------------------
class ToolChoiceError(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def function_name(tool: dict) -> str | None:
    """The name of an OpenAI tool, chat form `{"type": "function", "function": {...}}` or responses form."""
    fn = tool.get("function", tool) if isinstance(tool, dict) else None
    return fn.get("name") if isinstance(fn, dict) else None


def normalize_tool_choice(choice, names: list[str] | None, param: str = "tool_choice"):
    """`auto`, `none`, `required` or `("function", NAME)` from OpenAI's forms: a string, chat's
    `{"type": "function", "function": {"name": ...}}` or responses' `{"type": "function", "name": ...}`.
    `names`: the request's function names (None: not checked). Anything else is a ToolChoiceError naming it."""
    if choice is None:
        return "auto" if names else "none"
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise ToolChoiceError(f"{param}: expected 'auto', 'none', 'required' or a function, got {choice!r}", param)
        if choice == "required" and names is not None and not names:
            raise ToolChoiceError(f"{param}: 'required' needs tools", param)
        return choice
    if not isinstance(choice, dict):
        raise ToolChoiceError(f"{param}: expected a string or an object, got {type(choice).__name__}", param)
    kind = choice.get("type")
    if kind != "function":
        raise ToolChoiceError(f"{param}.type: {kind!r} is not supported by this local server (only 'function')",
                              f"{param}.type")
    fn = choice.get("function", choice)
    name = fn.get("name") if isinstance(fn, dict) else None
    where = f"{param}.function.name" if "function" in choice else f"{param}.name"
    if not isinstance(name, str) or not name:
        raise ToolChoiceError(f"{where}: expected a function name", where)
    if names is not None and name not in names:
        raise ToolChoiceError(f"{where}: no tool named {name!r} (tools: {', '.join(names) or 'none'})", where)
    return ("function", name)


# -- the grammar ---------------------------------------------------------------------------------------------
def _literal(added: dict[str, int], text: str) -> str:
    """A grammar literal for `text`: the single added token the tokenizer has for it, else the text itself."""
    return f"<[{added[text]}]>" if text in added else json.dumps(text)


def _tool_schema(tool: dict) -> dict:
    fn = tool.get("function", tool)
    params = fn.get("parameters")
    return params if isinstance(params, dict) and params else {"type": "object", "properties": {}}


def call_grammar(tokenizer, family: str, tools: list[dict], choice, *, parallel: bool = True,
                 thinking: bool = False) -> str:
    """The llguidance grammar of a response that is a call of `choice` (`required`: any of `tools`, several
    calls when `parallel`; `("function", NAME)`: one call of that one, as OpenAI's named choice) in `family`'s
    format (grpo.rollout.tools.template_family)."""
    parallel = parallel and choice == "required"
    by_name = {function_name(t): t for t in tools}
    names = list(by_name) if choice == "required" else [choice[1]]
    bad = [n for n in names if not isinstance(n, str) or not NAME_RE.match(n)]
    if bad:
        raise ToolChoiceError(f"tools: function name {bad[0]!r} must be 1-64 letters, digits, '_' or '-'", "tools")
    added = dict(tokenizer.get_added_vocab())
    rules = []
    if family == "harmony":
        def special(t: str) -> str:
            if t not in added:
                raise ToolChoiceError(f"the model's tokenizer has no {t} token for harmony tool calls", "tool_choice")
            return f"<[{added[t]}]>"

        ch, msg, call = special("<|channel|>"), special("<|message|>"), special("<|call|>")
        alts = []
        for i, n in enumerate(names):
            schema = {**_tool_schema(by_name[n]), "x-guidance": _COMPACT}
            rules.append(f"args{i}: %json {json.dumps(schema)}")
            alts.append(f'" to=functions.{n}" {ch} "commentary json" {msg} args{i} {call}')
        rules.insert(0, "call: " + " | ".join(alts))
        if thinking:
            rules.insert(0, f'analysis: {ch} "analysis" {msg} /(.|\\n)*/ {special("<|end|>")} '
                            f'{special("<|start|>")} "assistant"')
            rules.insert(0, "start: analysis? call")
        else:
            rules.insert(0, "start: call")
        return "\n".join(rules) + "\n"
    if family not in ("qwen3", "chatml_fallback"):
        raise ToolChoiceError(f"constrained tool calls are not available for template family {family!r}", "tool_choice")
    for i, n in enumerate(names):
        args = dict(_tool_schema(by_name[n]))
        defs = {k: args.pop(k) for k in ("$defs", "definitions") if k in args}  # `#/$defs/...` refs: from the root
        schema = {"type": "object", "properties": {"name": {"const": n}, "arguments": args},
                  "required": ["name", "arguments"], "additionalProperties": False, "x-guidance": _COMPACT, **defs}
        rules.append(f"body{i}: %json {json.dumps(schema)}")
    head = "start: " + ("think? " if thinking else "") + ('call ("\\n" call)*' if parallel else "call")
    bodies = " | ".join(f"body{i}" for i in range(len(names)))
    rules.insert(0, f'call: {_literal(added, "<tool_call>")} "\\n" ({bodies}) "\\n" {_literal(added, "</tool_call>")}')
    if thinking:
        rules.insert(0, f'think: {_literal(added, "<think>")} /(.|\\n)*/ {_literal(added, "</think>")} /\\s*/')
    rules.insert(0, head)
    return "\n".join(rules) + "\n"


# -- matching ------------------------------------------------------------------------------------------------
def call_end_ids(tokenizer, family: str) -> set[int]:
    """Tokens that end a turn made of a tool call besides the model's end tokens: harmony's `<|call|>` (real
    GPT-OSS lists it among its end tokens; a tokenizer's own eos may not)."""
    added = tokenizer.get_added_vocab()
    return {added["<|call|>"]} if family == "harmony" and "<|call|>" in added else set()


class RowConstraint:
    """One response's grammar state: `words()` the allowed tokens as a bitmask (int32 words, bit i of word
    i // 32 for token i), `advance(token)` after sampling. `finished` once the grammar has ended or an end token
    (`stop_ids`) was taken; later tokens (padding) are ignored."""

    def __init__(self, matcher, stop_ids: set[int]):
        self.matcher, self.stop_ids, self.finished = matcher, stop_ids, False

    def words(self):
        import numpy as np

        return np.frombuffer(self.matcher.compute_bitmask(), dtype=np.int32)

    def advance(self, token: int) -> None:
        if self.finished:
            return
        token = int(token)
        if token in self.stop_ids and (self.matcher.is_stopped() or self.matcher.is_accepting()):
            self.finished = True  # the end token closes the call (a stopped matcher takes no more tokens)
        elif self.matcher.is_stopped() or not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error() or 'it has ended'}")
        elif token in self.stop_ids:
            self.finished = True


class ToolConstraints:
    """llguidance's view of one tokenizer (about 1 s to build for a 150k vocabulary, so built once per
    tokenizer and vocabulary size) and the matchers made from it."""

    _cache: dict[tuple, "ToolConstraints"] = {}
    _lock = threading.Lock()

    def __init__(self, tokenizer, vocab_size: int, eos: list[int]):
        llg = _llguidance()
        self.llg, self.vocab_size = llg, max(vocab_size, len(tokenizer))
        self.lltok = llg.hf.from_tokenizer(tokenizer, n_vocab=self.vocab_size, eos_token=eos)
        self.tokenizer, self.eos = tokenizer, set(eos)

    @classmethod
    def for_tokenizer(cls, tokenizer, vocab_size: int, eos: list[int]) -> "ToolConstraints":
        key = (id(tokenizer), vocab_size, tuple(eos))
        with cls._lock:
            got = cls._cache.pop(key, None)
            if got is None or got.tokenizer is not tokenizer:
                got = cls(tokenizer, vocab_size, eos)
            cls._cache[key] = got  # most recent last; a few tokenizers at most (the server's model cache is small)
            while len(cls._cache) > 4:
                cls._cache.pop(next(iter(cls._cache)))
            return got

    def new(self, grammar: str, family: str) -> RowConstraint:
        m = self.llg.LLMatcher(self.lltok, grammar, log_level=0)
        if m.is_error():
            why = re.split(r"\n\s*\d+ \|", m.get_error() or "")[0]  # the reason, without the grammar's listing
            why = " ".join(why.split()).split(": ", 1)[-1][:300]
            raise ToolChoiceError(f"tools: a function's parameters cannot be enforced ({why})", "tools")
        return RowConstraint(m, self.eos | call_end_ids(self.tokenizer, family))


def mask_logits_(logits, rows: list[RowConstraint | None]) -> None:
    """Set to -inf, in place, every logit a row's grammar does not allow (rows without a constraint, or finished,
    untouched). One in-place fill over the batch: unconstrained rows get an all-allowed mask row."""
    import numpy as np
    import torch

    active = [i for i, r in enumerate(rows) if r is not None and not r.finished]
    if not active:
        return
    first = rows[active[0]].words()
    words = np.full((len(rows), first.shape[0]), -1, dtype=np.int32)  # -1: every bit set, every token allowed
    for i in active:
        words[i] = first if i == active[0] else rows[i].words()
    bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")  # bit k of word j: token 32 * j + k
    vocab = logits.shape[-1]
    blocked = torch.from_numpy(bits[:, :vocab] == 0)
    if blocked.shape[1] < vocab:  # logits past the tokenizer's vocabulary: never allowed in a constrained row
        extra = torch.zeros(len(rows), vocab - blocked.shape[1], dtype=torch.bool)
        extra[active] = True
        blocked = torch.cat([blocked, extra], dim=1)
    logits.masked_fill_(blocked.to(logits.device, non_blocking=True), float("-inf"))


class GrammarLogitsProcessor:
    """transformers `LogitsProcessor`: before each step it advances every row's grammar by the token sampled
    last, then masks. Rows are `input_ids`' rows, in order (None: a row without a constraint)."""

    def __init__(self, rows: list[RowConstraint | None], prompt_len: int):
        self.rows, self.prompt_len = rows, prompt_len

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] > self.prompt_len:
            for r, t in zip(self.rows, input_ids[:, -1].tolist()):
                if r is not None:
                    r.advance(t)
        mask_logits_(scores, self.rows)
        return scores


# -- rollouts ------------------------------------------------------------------------------------------------
def rollout_grammars(tokenizer, records, tool_choice: str, *, reasoning_effort: str = "low",
                     strict: bool = True, parallel: bool = True) -> list[str | None] | None:
    """One grammar per record for `engine.rollout.tool_choice` (None for `auto`): `required` constrains every
    record that has tools to a call of one of them (several calls when `parallel`:
    engine.rollout.parallel_tool_calls); a function name, every record whose tools include it. Other records
    sample freely. A setting that constrains no record is a UserError when `strict` (the training data: the job
    would not do what it says), else None (validation data without such records)."""
    if tool_choice == "auto":
        return None
    from grpo.rollout.tools import template_family

    family, out = template_family(tokenizer), []
    for r in records:
        tools = r.tools or []
        names = [function_name(t) for t in tools]
        choice = ("required" if names else None) if tool_choice == "required" else (
            ("function", tool_choice) if tool_choice in names else None)
        try:
            out.append(call_grammar(tokenizer, family, tools, choice, parallel=parallel,
                                    thinking=reasoning_effort != "low") if choice else None)
        except ToolChoiceError as e:
            raise UserError(f"engine.rollout.tool_choice={tool_choice!r}, record {r.id!r}: {e}") from None
    if not any(out):
        if not strict:
            return None
        raise UserError(f"engine.rollout.tool_choice={tool_choice!r}: no record has "
                        + ("tools" if tool_choice == "required" else f"a tool named {tool_choice!r}"))
    return out


def pick_grammars(grammars: list[str | None] | None, idx: list[int]) -> dict:
    """`{"grammars": [...]}` for the prompts `idx`, or `{}` when nothing is constrained (a sampler's keyword)."""
    return {"grammars": [grammars[i] for i in idx]} if grammars else {}


def row_constraints(tokenizer, model, grammars: list[str | None] | None, n: int, ends: list[int]):
    """A RowConstraint per sampled row (prompt-major, `n` samples each), or None without grammars."""
    if not grammars or not any(grammars):
        return None
    from grpo.rollout.tools import template_family

    family = template_family(tokenizer)
    vocab = model.get_output_embeddings().weight.shape[0]
    made = ToolConstraints.for_tokenizer(tokenizer, vocab, ends)
    return [made.new(g, family) if g else None for g in grammars for _ in range(n)]
