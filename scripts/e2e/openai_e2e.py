#!/usr/bin/env python3
"""End-to-end test of kiln's OpenAI API with the official `openai` client.

    python openai_e2e.py path/to/kiln [--keep-log FILE]

Starts `kiln serve --port 0 --api-key ...` (the default model), then talks to
it only through `openai.OpenAI`: models.list, completions and chat
completions, non-streaming and streaming, with logprobs, usage, stop, seed
and n, and the client's error classes for 401/404/400. Prints one line per
check and exits non-zero if any failed. Run it with scripts/e2e/run.sh,
which creates the virtual environment from requirements.txt.
"""

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

# The server is on loopback: never go through a proxy.
for var in ("NO_PROXY", "no_proxy"):
    os.environ[var] = ",".join(filter(None, [os.environ.get(var), "127.0.0.1", "localhost"]))

import openai  # noqa: E402
from openai import OpenAI  # noqa: E402

API_KEY = "e2e-secret-key"
MODEL = "default"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]

failures = []
passes = 0


def check(name, fn):
    global passes
    t0 = time.time()
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - every failure is reported
        failures.append(name)
        print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
    else:
        passes += 1
        print(f"ok   {name} ({time.time() - t0:.2f} s)", flush=True)


def expect(cond, what):
    if not cond:
        raise AssertionError(what)


def stop_server(proc):
    """Stops the server (SIGTERM, SIGKILL after 30 s); its exit status, None if it was killed."""
    proc.terminate()
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return None


def report(label, code, log):
    """Counts a server exit status other than 0 as a failure, prints the tally, and on any failure
    prints the server log's last 40 lines and exits 1."""
    if code != 0:
        failures.append(f"server exit status {code}")
    print(f"{label}: {passes} passed, {len(failures)} failed", flush=True)
    if failures:
        print("server log:\n" + "".join(log[-40:]), file=sys.stderr)
        sys.exit(1)


def start_server(binary, args=("--kv-cache-mib", "256"), ready_s=60, key=API_KEY):
    """`kiln serve` on a free port with the e2e API key and `args`; waits
    until /ping answers 200 (at most `ready_s` seconds after it listens).
    Shared by every e2e script here."""
    proc = subprocess.Popen(
        [binary, "serve", "--port", "0", "--api-key", key, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "NO_COLOR": "1", "KILN_LOG": os.environ.get("KILN_LOG", "info")},
    )
    log = []
    port = []
    ready = threading.Event()

    def pump():
        for line in proc.stderr:
            log.append(line)
            if line.startswith("kiln: listening on http://"):
                port.append(int(line.rsplit(":", 1)[1]))
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    if not ready.wait(60) or not port:
        proc.kill()
        raise SystemExit("kiln serve did not start:\n" + "".join(log))
    base = f"http://127.0.0.1:{port[0]}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.time() + ready_s
    while True:
        try:
            with opener.open(base + "/ping", timeout=5) as r:
                if r.status == 200:
                    break
        except Exception:  # noqa: BLE001 - 503 while loading
            pass
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            raise SystemExit("kiln serve did not become ready:\n" + "".join(log))
        time.sleep(0.1)
    return proc, base, log


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    binary = sys.argv[1]
    proc, base, log = start_server(binary)
    print(f"kiln serve at {base} (openai {openai.__version__})", flush=True)
    client = OpenAI(base_url=base + "/v1", api_key=API_KEY, timeout=120, max_retries=0)
    state = {}

    def models_list():
        ids = [m.id for m in client.models.list()]
        expect(MODEL in ids, f"{MODEL!r} not in {ids}")

    def completion():
        r = client.completions.create(
            model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, logprobs=2
        )
        c = r.choices[0]
        expect(r.object == "text_completion", r.object)
        expect(c.text.strip() != "", f"empty text: {r}")
        expect("Paris" in c.text, f"no Paris in {c.text!r}")
        expect(c.finish_reason in ("length", "stop"), c.finish_reason)
        u = r.usage
        expect(u.prompt_tokens > 0 and u.completion_tokens > 0, u)
        expect(u.total_tokens == u.prompt_tokens + u.completion_tokens, u)
        if c.finish_reason == "length":
            expect(u.completion_tokens == 8, u)
        lp = c.logprobs
        expect(len(lp.tokens) == u.completion_tokens, f"{len(lp.tokens)} logprob tokens for {u}")
        expect(all(x <= 0 for x in lp.token_logprobs), lp.token_logprobs)
        expect(all(1 <= len(t) <= 2 for t in lp.top_logprobs), lp.top_logprobs)
        expect("".join(lp.tokens) == c.text, f"{lp.tokens} vs {c.text!r}")
        state["completion"] = c.text

    def completion_stream():
        text, reasons = "", []
        for chunk in client.completions.create(
            model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
        ):
            for c in chunk.choices:
                text += c.text
                if c.finish_reason:
                    reasons.append(c.finish_reason)
        expect(text == state["completion"], f"{text!r} != {state['completion']!r}")
        expect(len(reasons) == 1, reasons)

    def completion_stop():
        r = client.completions.create(
            model=MODEL, prompt="The capital of France is", max_tokens=16, temperature=0, stop=["."]
        )
        c = r.choices[0]
        expect(c.finish_reason == "stop", c.finish_reason)
        expect("." not in c.text, repr(c.text))

    def completion_prompt_list():
        prompts = ["The capital of France is", "Once upon a time"]
        r = client.completions.create(
            model=MODEL, prompt=prompts, n=2, max_tokens=4, temperature=0, echo=True
        )
        expect([c.index for c in r.choices] == [0, 1, 2, 3], [c.index for c in r.choices])
        for c in r.choices:
            expect(c.text.startswith(prompts[c.index // 2]), f"choice {c.index}: {c.text!r}")
        expect(r.choices[0].text == prompts[0] + state["completion"][: len(r.choices[0].text) - len(prompts[0])],
               f"{r.choices[0].text!r} vs {state['completion']!r}")
        try:
            client.completions.create(model=MODEL, prompt="x", suffix="y", max_tokens=2)
            raise AssertionError("no error for suffix")
        except openai.BadRequestError as e:
            expect("suffix" in str(e), str(e))

    def chat():
        r = client.chat.completions.create(
            model=MODEL, messages=CAPITAL, temperature=0, max_tokens=32, logprobs=True, top_logprobs=2
        )
        c = r.choices[0]
        expect(r.object == "chat.completion", r.object)
        expect(c.message.role == "assistant", c.message.role)
        expect("Paris" in c.message.content, f"no Paris in {c.message.content!r}")
        expect(c.finish_reason in ("stop", "length"), c.finish_reason)
        u = r.usage
        expect(u.prompt_tokens > 10, f"the chat template adds tokens: {u}")
        expect(0 < u.completion_tokens <= 32, u)
        expect(u.total_tokens == u.prompt_tokens + u.completion_tokens, u)
        content = c.logprobs.content
        expect(len(content) == u.completion_tokens, f"{len(content)} logprobs for {u}")
        expect(all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in content), content[:2])
        state["chat"] = (c.message.content, c.finish_reason, u)

    def chat_stream():
        text, reasons, usage, roles = "", [], None, []
        stream = client.chat.completions.create(
            model=MODEL,
            messages=CAPITAL,
            temperature=0,
            max_tokens=32,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            expect(chunk.object == "chat.completion.chunk", chunk.object)
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                if c.delta.role:
                    roles.append(c.delta.role)
                if c.delta.content:
                    text += c.delta.content
                if c.finish_reason:
                    reasons.append(c.finish_reason)
        want_text, want_reason, want_usage = state["chat"]
        expect("Paris" in text, repr(text))
        expect(text == want_text, f"{text!r} != {want_text!r}")
        expect(roles == ["assistant"], roles)
        expect(reasons == [want_reason], reasons)
        expect(usage is not None, "no usage chunk")
        expect(usage.completion_tokens == want_usage.completion_tokens, usage)
        expect(usage.prompt_tokens == want_usage.prompt_tokens, usage)

    def chat_seed_n():
        def ask():
            r = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Write a word."}],
                temperature=1.0,
                max_tokens=8,
                n=2,
                seed=1234,
            )
            expect([c.index for c in r.choices] == [0, 1], r.choices)
            return [c.message.content for c in r.choices]

        a, b = ask(), ask()
        expect(a == b, f"same seed, different answers: {a} {b}")

    person = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    }

    def structured():
        # 20 seeded sampled answers (5 requests of n=4): each is schema-valid JSON.
        texts = []
        for seed in range(0, 20, 4):
            r = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "Invent a character."}],
                temperature=1.0,
                max_tokens=40,
                n=4,
                seed=seed,
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "person", "schema": person, "strict": True},
                },
            )
            for c in r.choices:
                expect(c.finish_reason == "stop", c)
                texts.append(c.message.content)
        for t in texts:
            v = json.loads(t)
            expect(sorted(v) == ["age", "name"], t)
            expect(isinstance(v["name"], str) and len(v["name"]) <= 12, t)
            expect(isinstance(v["age"], int) and 0 <= v["age"] <= 150, t)
        expect(len(texts) == 20, len(texts))
        try:
            client.chat.completions.create(
                model=MODEL,
                messages=CAPITAL,
                max_tokens=2,
                extra_body={"guided_whitespace_pattern": " "},
            )
            raise AssertionError("no error for an unknown constraint field")
        except openai.BadRequestError as e:
            expect("guided_whitespace_pattern" in str(e), str(e))

    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 20},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                },
                "required": ["city", "days"],
                "additionalProperties": False,
            },
        },
    }
    clock = {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"type": "string", "maxLength": 30}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    }
    ASK_WEATHER = [{"role": "user", "content": "What's the weather in Paris for 3 days?"}]

    def check_call(call):
        expect(call.type == "function" and call.id, call)
        args = json.loads(call.function.arguments)
        if call.function.name == "get_weather":
            expect(sorted(args) == ["city", "days"], args)
            expect(isinstance(args["city"], str) and len(args["city"]) <= 20, args)
            expect(isinstance(args["days"], int) and 1 <= args["days"] <= 7, args)
        else:
            expect(call.function.name == "get_time" and isinstance(args["zone"], str), call)

    def tools():
        # required and named choices: calls that parse and match the schema.
        for seed in range(4):
            r = client.chat.completions.create(
                model=MODEL, messages=ASK_WEATHER, tools=[weather, clock], tool_choice="required",
                parallel_tool_calls=False, max_tokens=60, seed=seed,
            )
            c = r.choices[0]
            expect(c.finish_reason == "tool_calls", c)
            expect(len(c.message.tool_calls) == 1, c)
            check_call(c.message.tool_calls[0])
        named = {"type": "function", "function": {"name": "get_time"}}
        r = client.chat.completions.create(
            model=MODEL, messages=ASK_WEATHER, tools=[weather, clock], tool_choice=named, max_tokens=80, seed=1,
            parallel_tool_calls=False,
        )
        expect(r.choices[0].message.tool_calls, r)
        call = r.choices[0].message.tool_calls[0]
        expect(call.function.name == "get_time", call)
        check_call(call)
        # Streamed: the deltas assemble to the non-streamed call.
        named = {"type": "function", "function": {"name": "get_weather"}}
        kw = dict(model=MODEL, messages=ASK_WEATHER, tools=[weather], tool_choice=named, max_tokens=60,
                  temperature=0, parallel_tool_calls=False)
        want = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
        name, args, reason = None, "", None
        for chunk in client.chat.completions.create(stream=True, **kw):
            if not chunk.choices:
                continue
            d = chunk.choices[0].delta
            for t in d.tool_calls or []:
                expect(t.index == 0, t)
                if t.function.name:
                    name = t.function.name
                args += t.function.arguments or ""
            reason = chunk.choices[0].finish_reason or reason
        expect((name, args) == (want.function.name, want.function.arguments), (name, args, want))
        expect(reason == "tool_calls", reason)
        # auto needs option.enable_auto_tool_choice, which a CLI-served model lacks.
        try:
            client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=[weather], max_tokens=4)
            raise AssertionError("no error for auto tool choice")
        except openai.BadRequestError as e:
            expect("option.enable_auto_tool_choice" in str(e), str(e))

    def errors():
        try:
            client.chat.completions.create(model="no-such-model", messages=CAPITAL, max_tokens=2)
            raise AssertionError("no error for an unknown model")
        except openai.NotFoundError:
            pass
        try:
            client.completions.create(model=MODEL, prompt="x", max_tokens=2, temperature=5)
            raise AssertionError("no error for temperature 5")
        except openai.BadRequestError as e:
            expect("temperature" in str(e), str(e))
        bad = OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
        try:
            bad.models.list()
            raise AssertionError("no error for a wrong API key")
        except openai.AuthenticationError:
            pass

    try:
        check("models.list", models_list)
        check("completions.create (greedy, logprobs, usage)", completion)
        if "completion" in state:
            check("completions.create stream", completion_stream)
        check("completions.create stop", completion_stop)
        if "completion" in state:
            check("completions.create prompt list, n=2, echo; suffix refused", completion_prompt_list)
        check("chat.completions.create (Paris, logprobs, usage)", chat)
        if "chat" in state:
            check("chat.completions.create stream (include_usage)", chat_stream)
        check("chat.completions.create n=2 seed", chat_seed_n)
        check("chat.completions.create response_format json_schema (20 sampled); unknown constraint refused", structured)
        check("chat.completions.create tools: required, named, streamed; auto refused", tools)
        check("errors (404, 400, 401)", errors)
    finally:
        code = stop_server(proc)
    report("e2e", code, log)


if __name__ == "__main__":
    main()
