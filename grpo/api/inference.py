"""Inference for the server: a small LRU cache of loaded models (base + optional peft adapter) and
token-by-token generation with the text split into final content and reasoning as it grows.

Generation runs in a thread (transformers' `generate` with a streamer); one generation at a time over
the whole server (a lock, held by the generation thread itself), so concurrent requests queue instead of
thrashing the CPU or GPU. A stream the client abandons stops its generation at the next token, and the lock
is free then, whatever becomes of the abandoned response generator. torch is imported on first use only, so
the server starts fast and jobs-only use never loads it.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

REASONING_OPENERS = ("<think>", "<|channel|>")  # how Qwen3 and harmony (GPT-OSS) responses start thinking
REASONING_CLOSER = "</think>"  # Qwen3's (harmony's <|end|> is one special token, never split)


@dataclass
class Loaded:
    model: object
    tokenizer: object
    specials: list[str]
    ends: list[int]


class ModelCache:
    def __init__(self, max_models: int = 2, *, dtype: str = "auto"):
        self.max_models = max(1, max_models)
        self.dtype = dtype  # grpo.models.loading.pick_dtype's names
        self._models: OrderedDict[tuple, Loaded] = OrderedDict()
        self._lock = threading.Lock()
        self.generate_lock = threading.Lock()

    def get(self, base: str, adapter: str | None) -> Loaded:
        key = (base, adapter)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            import torch

            from grpo.models.loading import load_for_inference, load_tokenizer, pick_dtype
            from grpo.rollout.prompts import end_token_ids, special_tokens

            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            tok = load_tokenizer(base)
            model = load_for_inference(base, adapter, dtype=pick_dtype(self.dtype, device)).to(device)
            loaded = Loaded(model, tok, special_tokens(tok), end_token_ids(tok, model))
            self._models[key] = loaded
            while len(self._models) > self.max_models:
                self._models.popitem(last=False)
            return loaded


def encode(loaded: Loaded, messages: list[dict], effort: str, tools: list[dict] | None = None) -> list[int]:
    """The prompt's ids: messages (tool calls and results included) and tools as the model's template writes them."""
    from grpo.rollout.prompts import encode_prompt

    return encode_prompt(loaded.tokenizer, messages, reasoning_effort=effort, tools=tools)


class _Streamer:
    """transformers streamer: the first `put` is the prompt (skipped), then one call per new token."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for t in value.reshape(-1).tolist():
            self.q.put(("token", t))

    def end(self) -> None:
        self.q.put(("end", None))


def generation_config(loaded: Loaded, *, max_new_tokens: int, temperature: float, top_p: float):
    """transformers' GenerationConfig for one request: greedy at temperature 0, stops at any end token;
    pads with the tokenizer's pad token (id 0 is a valid one), else the first end token."""
    from transformers import GenerationConfig

    sample = temperature > 0
    pad = loaded.tokenizer.pad_token_id
    return GenerationConfig(do_sample=sample, temperature=temperature if sample else None,
                            top_p=top_p if sample else None, top_k=0 if sample else None,
                            max_new_tokens=max_new_tokens, eos_token_id=loaded.ends,
                            pad_token_id=loaded.ends[0] if pad is None else pad)


class TokenStream:
    """Iterate for each sampled token id (the end token included when it comes); temperature 0 is greedy.

    The generation thread holds the server-wide `generate_lock` for as long as it runs, so the lock's life is
    the generation's, not the consumer's: `abort()` (from any thread, without waiting) stops the generation at
    its next token and so frees the lock, whether or not the consumer is ever resumed or closed. A stream whose
    client went away is aborted this way by the app (`grpo.api.app.AbortingStream`).

    `constraint`: a grpo.rollout.constrain.RowConstraint masking every step (a forced tool call); `ends`: end
    tokens instead of the model's (harmony's `<|call|>` ends a tool call's turn)."""

    def __init__(self, cache: ModelCache, loaded: Loaded, prompt_ids: list[int], *, max_new_tokens: int,
                 temperature: float, top_p: float, seed: int | None = None, constraint=None,
                 ends: list[int] | None = None):
        self.cache, self.loaded, self.prompt_ids, self.seed = cache, loaded, prompt_ids, seed
        self.constraint = constraint
        self.gen_cfg = generation_config(loaded, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)
        if ends:
            self.gen_cfg.eos_token_id = ends
        self.stop = threading.Event()
        self.streamer = _Streamer()
        self.thread: threading.Thread | None = None

    def abort(self) -> None:
        self.stop.set()

    def _run(self) -> None:
        import torch
        from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

        stop = self.stop
        processors = None
        if self.constraint is not None:  # before temperature and top-p (transformers appends its warpers after)
            from grpo.rollout.constrain import GrammarLogitsProcessor

            processors = LogitsProcessorList([GrammarLogitsProcessor([self.constraint], len(self.prompt_ids))])

        class _Abandoned(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                return stop.is_set()

        try:
            with self.cache.generate_lock:
                if stop.is_set():  # abandoned while it waited its turn
                    self.streamer.end()
                    return
                if self.seed is not None:
                    torch.manual_seed(self.seed)
                device = next(self.loaded.model.parameters()).device
                ids = torch.tensor([self.prompt_ids], dtype=torch.long, device=device)
                with torch.no_grad():
                    self.loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                               generation_config=self.gen_cfg, streamer=self.streamer,
                                               stopping_criteria=StoppingCriteriaList([_Abandoned()]),
                                               logits_processor=processors)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            self.streamer.q.put(("error", e))
            self.streamer.end()

    def __iter__(self) -> Iterator[int]:
        self.thread = threading.Thread(target=self._run, name="generate", daemon=True)
        self.thread.start()
        try:
            while True:
                kind, value = self.streamer.q.get()
                if kind == "end":
                    break
                if kind == "error":
                    raise value
                yield value
        finally:
            self.stop.set()
            self.thread.join()


def stream_tokens(cache: ModelCache, loaded: Loaded, prompt_ids: list[int], **params) -> TokenStream:
    """The tokens of one generation (see TokenStream)."""
    return TokenStream(cache, loaded, prompt_ids, **params)


class TextSplitter:
    """Tokens in, (content delta, reasoning delta) out: the decoded text so far is split with
    `grpo.rollout.prompts.split_reasoning` (Qwen3 `<think>`, harmony channels). A delta is given only while
    the new text extends what was already sent; text ending in an incomplete character, or in part of
    a thinking tag that a tokenizer spells in several tokens, waits for the next token."""

    def __init__(self, loaded: Loaded, ends: list[int] | None = None):
        self.loaded, self.ends = loaded, ends or loaded.ends
        self.text = ""  # the whole decoded response, special tokens kept
        self.ids: list[int] = []
        self.content, self.reasoning = "", ""  # what has been handed out
        self.hit_end = False

    def _split(self) -> tuple[str, str, bool]:
        """(content, reasoning, undecided): undecided while the text could still become a reasoning
        opener that is not a single token (`<thi` of `<think>`)."""
        from grpo.rollout.prompts import split_reasoning

        text = self.text = self.loaded.tokenizer.decode(self.ids, skip_special_tokens=False)
        content, reasoning = split_reasoning(text, self.loaded.specials)
        head = text.lstrip()
        undecided = bool(head) and any(opener.startswith(head) and opener != head for opener in REASONING_OPENERS)
        return content, reasoning or "", undecided

    def push(self, token: int) -> tuple[str, str]:
        if token in self.ends:
            self.hit_end = True
        self.ids.append(token)
        content, reasoning, undecided = self._split()
        return ("", "") if undecided else self._delta(content, reasoning, final=False)

    def _delta(self, content: str, reasoning: str, final: bool) -> tuple[str, str]:
        if not final:  # "...\n</thi": the end of the thinking is still arriving; keep it back
            for k in range(len(REASONING_CLOSER) - 1, 0, -1):
                if reasoning.endswith(REASONING_CLOSER[:k]):
                    reasoning = reasoning[:-k].rstrip()
                    break
        out = []
        for name, new in (("reasoning", reasoning), ("content", content)):
            old = getattr(self, name)
            if new.startswith(old) and (final or not new.endswith("\ufffd")):
                out.append(new[len(old):])
                setattr(self, name, new)
            else:
                out.append("")
        return out[1], out[0]

    def finish(self) -> tuple[str, str]:
        """Last deltas; afterwards `final_content`/`final_reasoning` are the whole split texts."""
        content, reasoning, _ = self._split() if self.ids else ("", "", False)
        self.final_content, self.final_reasoning = content, reasoning
        return self._delta(content, reasoning, final=True)

    def reasoning_tokens(self) -> int:
        text = getattr(self, "final_reasoning", self.reasoning)
        return len(self.loaded.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
