#!/usr/bin/env python3
"""End-to-end test of kiln's Anthropic Messages API with the official
`anthropic` client.

    python anthropic_e2e.py path/to/kiln

Starts `kiln serve --port 0 --api-key ...` (the default model; the client
sends the key as `x-api-key`), then talks to it only through
`anthropic.Anthropic`: messages.create (plain, stop_sequences), the raw
event stream and messages.stream with text deltas, a tool round trip with a
forced tool_choice (whole and streamed), count_tokens, and the client's
error classes for 400/401/404. Prints one line per check and exits non-zero
if any failed. Run it with scripts/e2e/run.sh, which creates the virtual
environment from requirements.txt.
"""

import json
import sys

# The same server start-up as the OpenAI test (loopback, no proxy, the key).
import openai_e2e as e2e  # noqa: E402  (the server start, stop and check helpers)
from openai_e2e import API_KEY, check, expect, start_server  # noqa: E402

import anthropic  # noqa: E402
from anthropic import Anthropic  # noqa: E402

MODEL = "default"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
TOOLS = [
    {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "input_schema": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    }
]
WEATHER = [{"role": "user", "content": "What's the weather in Paris for the next 3 days?"}]
# Greedy decoding. This version of the client no longer lists `temperature`
# (the API still takes it): it goes in the body as an extra field.
GREEDY = {"temperature": 0}
FORCED = {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True}

def text_of(message):
    return "".join(b.text for b in message.content if b.type == "text")


def prompt_tokens(usage):
    return usage.input_tokens + (usage.cache_read_input_tokens or 0) + (usage.cache_creation_input_tokens or 0)


def check_weather_call(block):
    expect(block.type == "tool_use", block)
    expect(block.name == "get_weather", block)
    expect(block.id.startswith("toolu_"), block.id)
    expect(isinstance(block.input, dict), f"input is not an object: {block.input!r}")
    expect(set(block.input) == {"city", "days"}, block.input)
    expect(isinstance(block.input["city"], str) and len(block.input["city"]) <= 20, block.input)
    expect(isinstance(block.input["days"], int) and 1 <= block.input["days"] <= 7, block.input)


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    binary = sys.argv[1]
    proc, base, log = start_server(binary)
    print(f"kiln serve at {base} (anthropic {anthropic.__version__})", flush=True)
    client = Anthropic(base_url=base, api_key=API_KEY, timeout=120, max_retries=0)
    state = {}

    def create():
        m = client.messages.create(
            model=MODEL,
            max_tokens=16,
            system="You are a geography teacher.",
            messages=CAPITAL,
            extra_body=GREEDY,
        )
        expect(m.type == "message" and m.role == "assistant", m)
        expect(m.id.startswith("msg_"), m.id)
        expect(m.model == MODEL, m.model)
        expect(m.stop_reason in ("end_turn", "max_tokens"), m.stop_reason)
        expect(text_of(m).strip() != "", f"empty text: {m}")
        u = m.usage
        expect(1 <= u.output_tokens <= 16, u)
        if m.stop_reason == "max_tokens":
            expect(u.output_tokens == 16, u)
        state["create"] = m

    def count_tokens():
        n = client.messages.count_tokens(
            model=MODEL, system="You are a geography teacher.", messages=CAPITAL
        ).input_tokens
        expect(n == prompt_tokens(state["create"].usage), f"{n} vs {state['create'].usage}")
        bigger = client.messages.count_tokens(
            model=MODEL,
            system="You are a geography teacher.",
            messages=CAPITAL + [{"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Spain?"}],
        ).input_tokens
        expect(bigger > n, f"{bigger} <= {n}")

    def stop_sequences():
        whole = text_of(state["create"])
        stop = whole[len(whole) // 2 : len(whole) // 2 + 2]
        m = client.messages.create(
            model=MODEL,
            max_tokens=16,
            system="You are a geography teacher.",
            messages=CAPITAL,
            extra_body=GREEDY,
            stop_sequences=["never-in-the-answer", stop],
        )
        expect(m.stop_reason == "stop_sequence", m)
        expect(m.stop_sequence == stop, f"{m.stop_sequence!r} vs {stop!r}")
        expect(text_of(m) == whole[: whole.find(stop)], f"{text_of(m)!r} vs {whole!r}")

    def raw_stream():
        kinds = []
        text = ""
        with client.messages.create(
            model=MODEL,
            max_tokens=16,
            system="You are a geography teacher.",
            messages=CAPITAL,
            extra_body=GREEDY,
            stream=True,
        ) as events:
            for e in events:
                kinds.append(e.type)
                if e.type == "content_block_delta" and e.delta.type == "text_delta":
                    text += e.delta.text
                if e.type == "message_delta":
                    expect(e.delta.stop_reason == state["create"].stop_reason, e)
                    expect(e.usage.output_tokens == state["create"].usage.output_tokens, e.usage)
        deltas = kinds.count("content_block_delta")
        # (The client reads `ping` events but does not hand them on.)
        want = ["message_start", "content_block_start"] + ["content_block_delta"] * deltas
        want += ["content_block_stop", "message_delta", "message_stop"]
        expect(deltas >= 1 and kinds == want, kinds)
        expect(text == text_of(state["create"]), f"{text!r} != {text_of(state['create'])!r}")

    def helper_stream():
        pieces = []
        with client.messages.stream(
            model=MODEL,
            max_tokens=16,
            system="You are a geography teacher.",
            messages=CAPITAL,
            extra_body=GREEDY,
        ) as s:
            for t in s.text_stream:
                pieces.append(t)
            final = s.get_final_message()
        expect(len(pieces) >= 1, pieces)
        expect("".join(pieces) == text_of(final), f"{pieces} vs {final}")
        expect(text_of(final) == text_of(state["create"]), f"{text_of(final)!r}")
        expect(final.stop_reason == state["create"].stop_reason, final.stop_reason)
        expect(prompt_tokens(final.usage) == prompt_tokens(state["create"].usage), final.usage)

    def tools():
        m = client.messages.create(
            model=MODEL, max_tokens=80, extra_body=GREEDY, tools=TOOLS, tool_choice=FORCED, messages=WEATHER
        )
        expect(m.stop_reason == "tool_use", m)
        uses = [b for b in m.content if b.type == "tool_use"]
        expect(len(uses) == 1, m.content)
        check_weather_call(uses[0])
        expect("tool_call" not in text_of(m), f"call markup leaked: {text_of(m)!r}")
        # Streamed: the SDK assembles the input_json_delta pieces into the same input.
        with client.messages.stream(
            model=MODEL, max_tokens=80, extra_body=GREEDY, tools=TOOLS, tool_choice=FORCED, messages=WEATHER
        ) as s:
            final = s.get_final_message()
        streamed = [b for b in final.content if b.type == "tool_use"]
        expect(final.stop_reason == "tool_use" and len(streamed) == 1, final)
        check_weather_call(streamed[0])
        expect(streamed[0].input == uses[0].input, f"{streamed[0].input} vs {uses[0].input}")
        # The round trip: the call and its result go back, the model answers.
        follow = WEATHER + [
            {"role": "assistant", "content": [b.model_dump() for b in m.content]},
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": uses[0].id,
                        "content": "Sunny, 24 C, all three days.",
                    }
                ],
            },
        ]
        answer = client.messages.create(
            model=MODEL, max_tokens=24, extra_body=GREEDY, tools=TOOLS, tool_choice={"type": "none"}, messages=follow
        )
        expect(answer.stop_reason in ("end_turn", "max_tokens"), answer)
        expect(all(b.type == "text" for b in answer.content) and text_of(answer).strip(), answer)
        n = client.messages.count_tokens(
            model=MODEL, tools=TOOLS, tool_choice={"type": "none"}, messages=follow
        ).input_tokens
        expect(n == prompt_tokens(answer.usage), f"{n} vs {answer.usage}")
        # `auto` needs the model's option.enable_auto_tool_choice, as on the chat route.
        try:
            client.messages.create(model=MODEL, max_tokens=8, tools=TOOLS, messages=WEATHER)
            raise AssertionError("tool_choice auto was taken without enable_auto_tool_choice")
        except anthropic.BadRequestError as e:
            expect("enable_auto_tool_choice" in str(e), str(e))

    def errors():
        try:
            client.messages.create(model="claude-no-such-model", max_tokens=8, messages=CAPITAL)
            raise AssertionError("no error for an unknown model")
        except anthropic.NotFoundError as e:
            expect(e.body["type"] == "error" and e.body["error"]["type"] == "not_found_error", e.body)
        try:
            client.messages.create(model=MODEL, max_tokens=8, messages=CAPITAL, extra_body={"best_of": 2})
            raise AssertionError("an unknown field was taken")
        except anthropic.BadRequestError as e:
            expect(e.body["error"]["type"] == "invalid_request_error", e.body)
            expect("best_of" in e.body["error"]["message"], e.body)
        image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
        try:
            client.messages.create(
                model=MODEL, max_tokens=8, messages=[{"role": "user", "content": [image]}]
            )
            raise AssertionError("an image block was taken")
        except anthropic.BadRequestError as e:
            expect("image" in e.body["error"]["message"], e.body)
        bad = Anthropic(base_url=base, api_key="wrong", max_retries=0)
        try:
            bad.messages.create(model=MODEL, max_tokens=8, messages=CAPITAL)
            raise AssertionError("no error for a wrong API key")
        except anthropic.AuthenticationError as e:
            expect(e.body["error"]["type"] == "authentication_error", e.body)

    try:
        check("messages.create (system, usage)", create)
        if "create" in state:
            check("messages.count_tokens", count_tokens)
            check("messages.create stop_sequences", stop_sequences)
            check("messages.create stream=True: event order", raw_stream)
            check("messages.stream text deltas", helper_stream)
        check("tools: forced tool_use, streamed, tool_result round trip; auto refused", tools)
        check("errors (404, 400 unknown field, 400 image, 401)", errors)
    finally:
        code = e2e.stop_server(proc)
    e2e.report("anthropic e2e", code, log)


if __name__ == "__main__":
    main()
