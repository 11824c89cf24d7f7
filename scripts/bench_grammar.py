"""Compare grammar libraries for constrained tool-call decoding (docs/tools_api.md): for each of xgrammar,
llguidance and outlines-core, on the tiny BPE tokenizer with Qwen3's template (the test models' vocabulary) and
on SmolLM2's 49k vocabulary: the time to wrap the tokenizer, to compile one hermes tool-call grammar
(`<tool_call>\\n{"name": ..., "arguments": <schema>}\\n</tool_call>`), and per token of a forced call the time
to compute the allowed-token mask and advance the matcher. Then grpo.rollout.constrain's own decode step (masks
applied to a logits batch of 1 and 8 rows).

    python scripts/bench_grammar.py [--libs llguidance,outlines-core,xgrammar] [--paths DIR,...]

`--paths`: extra import directories (e.g. `pip install --no-deps --target DIR xgrammar ...`), so that a
library can be measured without installing it into the project's environment. A library that does not
import is reported as such. Prints the machine's load beside the numbers: on a shared machine they are
contended figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 24},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 14}},
    "required": ["city", "unit", "days"], "additionalProperties": False}
CALL = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", "days": 3}}
PREFIX, SUFFIX = "<tool_call>\n", "\n</tool_call>"
BODY = {"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": SCHEMA},
        "required": ["name", "arguments"], "additionalProperties": False}


def tokenizers(quick: bool = False):
    from grpo.models.loading import chat_tokenizer, load_tokenizer, resolve_model_path

    out = [("tiny qwen3 (test models)", chat_tokenizer("qwen3"))]
    if quick:
        return out
    try:
        out.append(("SmolLM2-135M (49k)", load_tokenizer(resolve_model_path("grpo:smollm2-135m-instruct"))))
    except Exception as e:  # noqa: BLE001 - optional: the package with its GGUF may be absent
        print(f"SmolLM2 tokenizer unavailable ({e}); tiny tokenizer only")
    return out


def target_ids(tok) -> list[int]:
    text = PREFIX + json.dumps(CALL) + SUFFIX
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def bench_llguidance(tok, ids):
    import llguidance
    import llguidance.hf

    t0 = time.perf_counter()
    lt = llguidance.hf.from_tokenizer(tok, n_vocab=len(tok))
    t1 = time.perf_counter()
    body = dict(BODY, **{"x-guidance": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}})
    grammar = f"start: {json.dumps(PREFIX)} body {json.dumps(SUFFIX)}\nbody: %json {json.dumps(body)}\n"
    m = llguidance.LLMatcher(lt, grammar, log_level=0)
    t2 = time.perf_counter()
    assert not m.is_error(), m.get_error()
    per = []
    for t in ids:
        s = time.perf_counter()
        mask = m.compute_bitmask()
        ok = m.consume_token(t)
        per.append(time.perf_counter() - s)
        assert mask[t // 8] >> (t % 8) & 1 and ok, ("llguidance refused the call at", t, m.get_error())
    return t1 - t0, t2 - t1, per


def bench_outlines(tok, ids):
    import outlines_core as oc

    t0 = time.perf_counter()
    vocab = {}
    for i in range(len(tok)):
        if i == tok.eos_token_id:
            continue
        s = tok.decode([i])
        if "\ufffd" in s:  # a partial UTF-8 byte: outlines takes the byte-level token form
            s = tok.convert_ids_to_tokens(i)
        vocab.setdefault(s, []).append(i)
    v = oc.Vocabulary(tok.eos_token_id, vocab)
    t1 = time.perf_counter()
    regex = re.escape(PREFIX) + oc.json_schema.build_regex_from_schema(json.dumps(BODY), r"[ ]?") + re.escape(SUFFIX)
    index = oc.Index(regex, v)
    guide = oc.Guide(index)
    t2 = time.perf_counter()
    per = []
    for t in ids:
        s = time.perf_counter()
        allowed = guide.get_tokens()
        ok = t in allowed
        if t != tok.eos_token_id:
            guide.advance(t)
        per.append(time.perf_counter() - s)
        assert ok, ("outlines-core refused the call at", t)
    return t1 - t0, t2 - t1, per


def bench_xgrammar(tok, ids):
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
    compiler = xgr.GrammarCompiler(info)
    t1 = time.perf_counter()
    grammar = xgr.Grammar.concat(xgr.Grammar.from_regex(re.escape(PREFIX)),
                                 xgr.Grammar.from_json_schema(json.dumps(BODY), any_whitespace=False),
                                 xgr.Grammar.from_regex(re.escape(SUFFIX)))
    compiled = compiler.compile_grammar(grammar)
    m = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)
    t2 = time.perf_counter()
    per = []
    for t in ids:
        s = time.perf_counter()
        m.fill_next_token_bitmask(bitmask)
        ok = m.accept_token(t)
        per.append(time.perf_counter() - s)
        assert ok, ("xgrammar refused the call at", t)
    return t1 - t0, t2 - t1, per


def bench_decode_step(tok, ids, rows: int) -> float:
    """Seconds per decode step of grpo.rollout.constrain as the sampler runs it: `rows` matchers, their masks
    applied to a [rows, vocab] logits tensor in place, each matcher advanced by the step's token."""
    import torch

    from grpo.rollout.constrain import ToolConstraints, call_grammar, mask_logits_
    from grpo.rollout.tools import template_family

    family = template_family(tok)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}]
    made = ToolConstraints.for_tokenizer(tok, len(tok), [tok.eos_token_id])
    cons = [made.new(call_grammar(tok, family, tools, ("function", "get_weather")), family) for _ in range(rows)]
    logits = torch.randn(rows, len(tok))
    start = time.perf_counter()
    for t in ids:
        mask_logits_(logits, cons)
        for c in cons:
            c.advance(t)
    return (time.perf_counter() - start) / len(ids)


BENCH = {"llguidance": bench_llguidance, "outlines-core": bench_outlines, "xgrammar": bench_xgrammar}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--libs", default=",".join(BENCH), help="comma-separated, of: " + ", ".join(BENCH))
    ap.add_argument("--paths", default="", help="comma-separated extra import directories")
    ap.add_argument("--quick", action="store_true", help="llguidance on the tiny tokenizer only: the checks on (every "
                    "token of the forced call accepted), the timings printed but no figure (tests/test_bench_quick.py)")
    args = ap.parse_args()
    if args.quick:
        args.libs = "llguidance"
    sys.path[:0] = [p for p in args.paths.split(",") if p]
    import torch

    torch.set_num_threads(1)  # as the server and the tests run; two threads spin against each other on a busy box
    from grpo.bench import LoadWatch

    LoadWatch(1).at_exit()
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores (contended if above ~0.5)")
    print(f"{'library':<14} {'tokenizer':<26} {'vocab':>6} {'wrap ms':>9} {'compile ms':>11} {'mask+advance us/token':>22}")
    measured = 0
    for name, tok in tokenizers(args.quick):
        ids = target_ids(tok)
        for lib in [x for x in args.libs.split(",") if x]:
            try:
                wrap, compile_s, per = BENCH[lib](tok, ids)
            except ImportError as e:
                print(f"{lib:<14} {name:<26} not importable: {e}")
                continue
            per, measured = sorted(per), measured + 1
            print(f"{lib:<14} {name:<26} {len(tok):>6} {wrap * 1e3:>9.1f} {compile_s * 1e3:>11.1f} "
                  f"{sum(per) / len(per) * 1e6:>12.0f} (p50 {per[len(per) // 2] * 1e6:.0f})")
    print("grpo.rollout.constrain in the decode loop (llguidance): mask + in-place fill + advance per step")
    for name, tok in tokenizers(args.quick):
        ids = target_ids(tok)
        print("  " + name + ": " + ", ".join(f"{rows} row(s) {bench_decode_step(tok, ids, rows) * 1e3:.2f} ms"
                                              for rows in (1, 8)))
    if not measured:
        print("checks: FAILED: no grammar library could be imported")
        return 1
    print("checks: every library that imported accepted the forced call token by token: OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
