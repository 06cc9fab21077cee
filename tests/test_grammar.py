"""Structured output on a tiny random model: the grammar alone must make its output valid.

Schemas keep strings, arrays and numbers bounded so that even random sampling finishes
well inside max_new_tokens. Each test seeds torch's RNG, which the sampler draws from, so
runs repeat (per-request seeds would too, but their hashed draws cost more on CPU).
"""

from __future__ import annotations

import json
import re
import threading
import uuid

import jsonschema
import pytest
import torch

from radixserve.core.sampling_params import SamplingParams
from radixserve.engine import Engine
from radixserve.managers.io_struct import TokenizedGenerateReqInput
from radixserve.parsers import get_tool_call_parser
from tests.model_factory import make_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(make_tiny_checkpoint("qwen3", tmp_path_factory.mktemp("qwen3")))


@pytest.fixture(scope="module")
def engine(checkpoint):
    eng = Engine(model_path=checkpoint, max_total_tokens=8192)
    yield eng
    eng.shutdown()


@pytest.fixture(autouse=True)
def _seed_sampler():
    torch.manual_seed(1234)


def assert_no_kv_leak(engine: Engine) -> None:
    info = engine.get_server_info()
    assert info.num_running_reqs == 0 and info.num_waiting_reqs == 0
    assert info.available_tokens + info.evictable_tokens == info.max_total_num_tokens


def schema_zoo(n: int) -> list[dict]:
    """n assorted schemas: nested objects, arrays, enums, bounded numbers, required fields."""
    out = []
    for k in range(n):
        lo, hi = -k, 10 + 3 * k
        out.append([
            {"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 3 + k % 6},
                "age": {"type": "integer", "minimum": 0, "maximum": hi}},
             "required": ["name", "age"]},
            {"type": "object", "properties": {"color": {"enum": ["red", "green", f"c{k}"]}},
             "required": ["color"]},
            {"type": "object", "properties": {"user": {"type": "object", "properties": {
                "id": {"type": "integer", "minimum": 1, "maximum": 999},
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 4},
                         "maxItems": 1 + k % 3}}, "required": ["id", "tags"]}},
             "required": ["user"]},
            {"type": "array", "minItems": 1, "maxItems": 2 + k % 2, "items": {
                "type": "object", "properties": {
                    "x": {"type": "integer", "minimum": lo, "maximum": hi},
                    "ok": {"type": "boolean"}}, "required": ["x", "ok"]}},
            {"type": "object", "properties": {"score": {"type": "number", "minimum": 0,
                                                        "maximum": 1 + k}},
             "required": ["score"]},
            {"type": "object", "properties": {
                "a": {"type": "integer", "minimum": lo, "maximum": 9},
                "b": {"type": "string", "maxLength": 3}, "c": {"type": "null"}},
             "required": ["a"]},
            {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2,3}$"},
            {"type": "object", "properties": {"point": {"type": "array", "minItems": 2,
                                                        "maxItems": 3, "items": {
                                                            "type": "integer", "minimum": -9,
                                                            "maximum": 9}}},
             "required": ["point"]},
            {"anyOf": [{"type": "object", "properties": {"yes": {"type": "boolean"}},
                        "required": ["yes"]},
                       {"type": "object", "properties": {"n": {"enum": [1, 2, 3]}},
                        "required": ["n"]}]},
            {"type": "object", "properties": {"status": {"const": "ok"},
                                              "items": {"type": "array", "maxItems": 2,
                                                        "items": {"enum": ["a", "b"]}}},
             "required": ["status", "items"]},
        ][k % 10])
    return out


def test_fifty_json_schemas_in_one_batch(engine):
    schemas = schema_zoo(50)
    cached_before = len(engine.scheduler.grammar._cache)
    params = [{"json_schema": json.dumps(s), "max_new_tokens": 256} for s in schemas]
    outs = engine.generate([f"Request {k}: JSON please." for k in range(50)], params)
    for schema, out in zip(schemas, outs):
        assert out["meta_info"]["finish_reason"]["type"] == "stop", out
        jsonschema.validate(json.loads(out["text"]), schema)
    # Compiled once per distinct schema text.
    compiled = len(engine.scheduler.grammar._cache) - cached_before
    assert compiled == len({json.dumps(s) for s in schemas}) < len(schemas)
    assert_no_kv_leak(engine)


REGEXES = [r"[a-z]{2,5}-\d{1,3}", r"(yes|no|maybe)", r"\d{3}-\d{4}",
           r"[A-Z][a-z]{1,8}( [A-Z][a-z]{1,8}){0,2}", r"0x[0-9a-f]{2,8}",
           r"[a-z]{1,6}@[a-z]{1,6}\.(com|org)"]


def test_regex_outputs_match(engine):
    cases = REGEXES
    outs = engine.generate(["Answer:"] * len(cases), [{"regex": r, "max_new_tokens": 64}
                                                      for r in cases])
    for pattern, out in zip(cases, outs):
        assert out["meta_info"]["finish_reason"]["type"] == "stop"
        assert re.fullmatch(pattern, out["text"]), (pattern, out["text"])
    assert_no_kv_leak(engine)


# Bounded repetition and nesting, so that a random model always finishes.
ARITHMETIC = r"""
root ::= expr
expr ::= term (("+" | "-") term){0,3}
term ::= factor (("*" | "/") factor){0,2}
factor ::= num | "(" inner ")"
inner ::= num (("+" | "-" | "*" | "/") num){0,3}
num ::= "0" | [1-9] [0-9]?
"""


def parses_as_arithmetic(text: str) -> bool:
    """Recursive descent over +-*/ expressions with parentheses (any depth and length,
    so a superset of ARITHMETIC): does it consume all of `text`?"""
    pos = 0

    def num() -> bool:
        nonlocal pos
        m = re.compile(r"0|[1-9][0-9]?").match(text, pos)
        if m is None:
            return False
        pos = m.end()
        return True

    def factor() -> bool:
        nonlocal pos
        if text.startswith("(", pos):
            pos += 1
            if not expr() or not text.startswith(")", pos):
                return False
            pos += 1
            return True
        return num()

    def chain(item, ops: str) -> bool:
        nonlocal pos
        if not item():
            return False
        while pos < len(text) and text[pos] in ops:
            pos += 1
            if not item():
                return False
        return True

    def term() -> bool:
        return chain(factor, "*/")

    def expr() -> bool:
        return chain(term, "+-")

    return expr() and pos == len(text)


def test_ebnf_outputs_parse(engine):
    outs = engine.generate(["Compute:"] * 6, [{"ebnf": ARITHMETIC, "max_new_tokens": 256}] * 6)
    for out in outs:
        assert out["meta_info"]["finish_reason"]["type"] == "stop"
        assert parses_as_arithmetic(out["text"]), out["text"]
    assert not parses_as_arithmetic("1+(2") and not parses_as_arithmetic("012")
    assert_no_kv_leak(engine)


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {
            "city": {"enum": ["Paris", "Rome", "Oslo"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
            "units": {"enum": ["C", "F"]}},
        "required": ["city", "days"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {
            "a": {"type": "integer", "minimum": -99, "maximum": 99},
            "b": {"type": "integer", "minimum": -99, "maximum": 99}},
        "required": ["a", "b"]}}},
]


@pytest.mark.parametrize("parser_name", ["hermes", "llama3", "mistral"])
def test_forced_tool_calls_validate(engine, parser_name):
    parser = get_tool_call_parser(parser_name)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    named = {"type": "function", "function": {"name": "add"}}
    # (tool_choice, parallel_tool_calls)
    cases = [("required", False), ("required", False), ("required", True), (named, True)]
    outs = engine.generate(["What is the weather?"] * len(cases), [
        {"ebnf": parser.tool_choice_grammar(TOOLS, choice, parallel), "max_new_tokens": 160}
        for choice, parallel in cases])
    for (choice, parallel), out in zip(cases, outs):
        calls = parser.parse(out["text"]).tool_calls
        assert parser.parse(out["text"]).content == "" and calls, out["text"]
        if out["meta_info"]["finish_reason"]["type"] == "length":
            # A random model may chain parallel calls past max_new_tokens; the others end.
            assert choice == "required" and parallel
            calls = calls[:-1]
        else:
            assert out["meta_info"]["finish_reason"]["type"] == "stop"
        if choice == named:
            assert [c.name for c in calls] == ["add"]
        if not parallel:
            assert len(calls) == 1
        for call in calls:
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])
    assert_no_kv_leak(engine)


def test_any_json(engine):
    outs = engine.generate(["{"] * 2, [{"json_schema": "$$ANY$$", "max_new_tokens": 32}] * 2)
    for out in outs:
        assert out["text"][:1] in ("{", "[")
        if out["meta_info"]["finish_reason"]["type"] == "stop":
            json.loads(out["text"])
    assert_no_kv_leak(engine)


BAD = [
    ({"json_schema": "{not json"}, "json_schema is not valid JSON"),
    ({"json_schema": json.dumps({"type": "objekt"})}, "invalid json_schema: .*objekt"),
    ({"regex": "[a-"}, "invalid regex: .*Unclosed"),
    ({"ebnf": "root ::= undefined_rule"}, "invalid ebnf: .*undefined_rule"),
    ({"json_schema": {"type": "object"}}, "json_schema must be a string"),
]


@pytest.mark.parametrize("params,message", BAD)
def test_bad_grammar_raises_value_error(engine, params, message):
    with pytest.raises(ValueError, match=message):
        engine.generate("Hi", {**params, "max_new_tokens": 8})
    assert_no_kv_leak(engine)


def _tokenized(params: dict) -> TokenizedGenerateReqInput:
    sp = SamplingParams.from_dict(params)
    sp.verify()
    sp.normalize()
    return TokenizedGenerateReqInput(rid=uuid.uuid4().hex, input_text=None,
                                     input_ids=[1, 2, 3, 4, 5], sampling_params=sp)


def _run(scheduler, reqs: list[TokenizedGenerateReqInput],
         also: tuple[str, ...] = ()) -> dict[str, tuple[dict, list[int]]]:
    """Add `reqs`, then step until they (and the rids in `also`) finished:
    rid -> (finish reason, output ids)."""
    for r in reqs:
        scheduler.add_request(r)
    want = {r.rid for r in reqs} | set(also)
    ids: dict[str, list[int]] = {}
    done: dict[str, tuple[dict, list[int]]] = {}
    while not want <= done.keys():
        out = scheduler.step()
        if out is None:
            continue
        for rid, new, reason in zip(out.rids, out.new_output_ids, out.finished_reasons):
            ids.setdefault(rid, []).extend(new)
            if reason is not None:
                done[rid] = (reason, ids[rid])
    return done


def test_bad_grammars_leave_concurrent_requests_unharmed(engine):
    plain = [_tokenized({"max_new_tokens": 16, "ignore_eos": True}) for _ in range(4)]
    bad = [_tokenized({**params, "max_new_tokens": 16}) for params, _ in BAD[:4]]
    good = _tokenized({"json_schema": json.dumps(schema_zoo(1)[0]), "max_new_tokens": 64})
    reqs = [plain[0], bad[0], plain[1], bad[1], good, plain[2], bad[2], plain[3], bad[3]]
    done = _run(engine.scheduler, reqs)
    for r in plain:
        reason, ids = done[r.rid]
        assert reason == {"type": "length", "length": 16} and len(ids) == 16
    for r, (_, message) in zip(bad, BAD):
        reason, _ = done[r.rid]
        assert reason["type"] == "abort" and reason["status_code"] == 400
        assert re.search(message, reason["message"])
    assert done[good.rid][0]["type"] == "stop"
    assert_no_kv_leak(engine)


def test_compiling_grammar_does_not_block_others(engine):
    """A request waits for its grammar; the others keep decoding meanwhile."""
    grammar = engine.scheduler.grammar
    gate = threading.Event()
    compile_now = grammar._compile

    def slow_compile(key):
        assert gate.wait(timeout=60)
        return compile_now(key)

    grammar._compile = slow_compile
    try:
        plain = _tokenized({"max_new_tokens": 8, "ignore_eos": True})
        constrained = _tokenized({"regex": r"(slow|compile)-[0-9]", "max_new_tokens": 16})
        engine.scheduler.add_request(constrained)
        done = _run(engine.scheduler, [plain])
        assert len(done[plain.rid][1]) == 8
        waiting = engine.scheduler.get_server_info()
        assert waiting.num_waiting_reqs == 1 and waiting.num_running_reqs == 0
        gate.set()
        done = _run(engine.scheduler, [], also=(constrained.rid,))
    finally:
        grammar._compile = compile_now
        gate.set()
    reason, ids = done[constrained.rid]
    assert reason["type"] == "stop"
    assert re.fullmatch(r"(slow|compile)-[0-9]", engine.tokenizer.decode(ids[:-1]))
    assert_no_kv_leak(engine)


def test_grammar_backend_none_rejects_grammars(checkpoint):
    eng = Engine(model_path=checkpoint, max_total_tokens=1024, grammar_backend="none")
    try:
        with pytest.raises(ValueError, match="--grammar-backend none"):
            eng.generate("Hi", {"regex": "a+", "max_new_tokens": 4})
        assert eng.generate("Hi", {"max_new_tokens": 4, "ignore_eos": True})["output_ids"]
        assert_no_kv_leak(eng)
    finally:
        eng.shutdown()


def test_grammar_under_overlap_schedule(checkpoint):
    """The overlapped loop launches a grammar batch's forward before the previous
    batch's tokens are accepted, and samples it only after: outputs (greedy and seeded)
    equal the plain loop's token for token, and requests that end on a grammar's EOS
    one step before the loop sees it leak nothing."""
    schemas = schema_zoo(6)
    params = [{"json_schema": json.dumps(s), "max_new_tokens": 128,
               **({"temperature": 0} if i % 2 else {"temperature": 0.8, "seed": i})}
              for i, s in enumerate(schemas)]
    params += [{"max_new_tokens": 24, "temperature": 0},
               {"regex": r"(yes|no)-[0-9]{1,3}", "max_new_tokens": 32, "temperature": 0}]
    outputs = {}
    for overlap in (False, True):
        eng = Engine(model_path=checkpoint, max_total_tokens=2048, enable_cpu_overlap=overlap)
        try:
            outs = eng.generate(["JSON:"] * len(params), params)
            for schema, out in zip(schemas, outs):
                jsonschema.validate(json.loads(out["text"]), schema)
            assert re.fullmatch(r"(yes|no)-[0-9]{1,3}", outs[-1]["text"])
            assert_no_kv_leak(eng)
            outputs[overlap] = [(o["output_ids"], o["meta_info"]["finish_reason"]) for o in outs]
        finally:
            eng.shutdown()
    assert outputs[True] == outputs[False]


def test_grammar_batch_samples_after_previous_batch_is_processed(checkpoint):
    """Under overlap, a grammar batch does not wait for the batch in flight: its forward
    is launched first, the previous batch is processed (its tokens accepted), and only
    then is its sampling launched."""
    eng = Engine(model_path=checkpoint, max_total_tokens=2048, enable_cpu_overlap=True)
    sched, runner = eng.scheduler, eng.scheduler.model_runner
    events: list[str] = []
    launch_forward, launch_sampling, process = (runner.launch_forward, runner.launch_sampling,
                                                sched._process)

    def spy(name, fn):
        def wrapped(*args):
            events.append(name)
            return fn(*args)
        return wrapped

    runner.launch_forward = spy("forward", launch_forward)
    runner.launch_sampling = spy("sample", launch_sampling)
    sched._process = spy("process", process)
    try:
        schema = json.dumps(schema_zoo(1)[0])
        out = eng.generate("JSON:", {"json_schema": schema, "max_new_tokens": 64,
                                     "temperature": 0})
        jsonschema.validate(json.loads(out["text"]), schema_zoo(1)[0])
        steps = "".join({"forward": "f", "sample": "s", "process": "p"}[e] for e in events)
        # Decode steps with a batch in flight run forward, process, sample.
        assert steps.count("fps") >= out["meta_info"]["completion_tokens"] - 2, steps
        assert_no_kv_leak(eng)
    finally:
        eng.shutdown()
