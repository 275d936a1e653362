#!/usr/bin/env python3
"""End-to-end test of kiln's /v1/responses with the official `openai` client.

    python responses_e2e.py path/to/kiln

Starts `kiln serve --port 0 --api-key ...` (the default model) as
openai_e2e.py does, then talks to it only through `openai.OpenAI`'s
`responses` resource: create (plain, with instructions, chained with
previous_response_id), create with stream=True collecting
`response.output_text.delta`, a forced function call and its round trip with
`function_call_output`, structured output through `responses.parse` with a
pydantic model (text.format json_schema), retrieve, input_items.list and
delete, and the client's error classes for what kiln refuses. Prints one
line per check and exits non-zero if any failed. scripts/e2e/run.sh runs it
after openai_e2e.py.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import openai_e2e as e2e  # noqa: E402  (the server start and check helpers)
from openai_e2e import check, expect  # noqa: E402

import openai  # noqa: E402
import pydantic  # noqa: E402
from openai import OpenAI  # noqa: E402

QUESTION = "What is the capital of France?"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather in a city.",
    "strict": True,
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "days"],
        "additionalProperties": False,
    },
}


class City(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=24)
    population: int = pydantic.Field(ge=0)


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    proc, base, log = e2e.start_server(sys.argv[1])
    print(f"kiln serve at {base} (openai {openai.__version__})", flush=True)
    client = OpenAI(base_url=base + "/v1", api_key=e2e.API_KEY, timeout=120, max_retries=0)
    state = {}

    def plain():
        r = client.responses.create(
            model=e2e.MODEL, input=QUESTION, max_output_tokens=16, temperature=0,
            metadata={"suite": "e2e"},
        )
        expect(r.object == "response" and r.id.startswith("resp_"), r)
        expect(r.status in ("completed", "incomplete"), r.status)
        expect("Paris" in r.output_text, r.output_text)
        expect(r.usage.input_tokens > 10 and r.usage.output_tokens >= 1, r.usage)
        expect(r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens, r.usage)
        expect(r.instructions is None and r.metadata == {"suite": "e2e"}, r)
        state["plain"] = r

    def chained():
        first = state["plain"]
        r = client.responses.create(
            model=e2e.MODEL, input="And of Germany?", previous_response_id=first.id,
            max_output_tokens=16, temperature=0, instructions="You are a geography teacher.",
        )
        expect(r.previous_response_id == first.id and r.instructions == "You are a geography teacher.", r)
        # The second turn carries the first: a longer prompt.
        expect(r.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens - 8, r.usage)
        expect(r.output_text, r)

    def streamed():
        whole = client.responses.create(model=e2e.MODEL, input=QUESTION, max_output_tokens=16, temperature=0)
        stream = client.responses.create(
            model=e2e.MODEL, input=QUESTION, max_output_tokens=16, temperature=0, stream=True,
        )
        deltas, types, final = [], [], None
        for ev in stream:
            types.append(ev.type)
            if ev.type == "response.output_text.delta":
                deltas.append(ev.delta)
            if ev.type in ("response.completed", "response.incomplete"):
                final = ev.response
        expect(types[:2] == ["response.created", "response.in_progress"], types)
        expect(final is not None and types[-1] == "response." + ("completed" if final.status == "completed" else "incomplete"), types)
        expect(len(deltas) >= 2, deltas)
        expect("".join(deltas) == whole.output_text == final.output_text, ("".join(deltas), whole.output_text))

    def tools():
        r = client.responses.create(
            model=e2e.MODEL, input="What's the weather in Paris for the next 3 days?",
            tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"},
            parallel_tool_calls=False, max_output_tokens=80, temperature=0,
        )
        calls = [o for o in r.output if o.type == "function_call"]
        expect(len(calls) == 1 and r.output_text == "", r.output)
        call = calls[0]
        args = json.loads(call.arguments)
        expect(call.name == "get_weather" and call.call_id.startswith("call_"), call)
        expect(isinstance(args["city"], str) and 1 <= args["days"] <= 7, args)
        follow = client.responses.create(
            model=e2e.MODEL, previous_response_id=r.id, tools=[WEATHER], tool_choice="none",
            input=[{"type": "function_call_output", "call_id": call.call_id,
                    "output": json.dumps({"forecast": "sunny, 24 C"})}],
            max_output_tokens=32, temperature=0,
        )
        expect(follow.output_text, follow)
        # Streamed: the arguments arrive as function_call_arguments events.
        events = list(client.responses.create(
            model=e2e.MODEL, input="What's the weather in Paris for the next 3 days?",
            tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
            max_output_tokens=80, temperature=0, stream=True,
        ))
        done = [e for e in events if e.type == "response.function_call_arguments.done"]
        deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        expect(len(done) == 1 and deltas == done[0].arguments, [e.type for e in events])
        json.loads(deltas)
        # auto needs the model's setting (as on the chat route).
        try:
            client.responses.create(model=e2e.MODEL, input="hi", tools=[WEATHER], max_output_tokens=4)
        except openai.BadRequestError as e:
            expect("enable_auto_tool_choice" in str(e), e)
        else:
            raise AssertionError("tool_choice auto was taken without the setting")

    def structured():
        r = client.responses.parse(
            model=e2e.MODEL, input="Give the largest city of France and its population as JSON.",
            text_format=City, max_output_tokens=60, temperature=0,
        )
        expect(isinstance(r.output_parsed, City), r.output_text)
        expect(r.output_parsed.population >= 0, r.output_parsed)
        r = client.responses.create(
            model=e2e.MODEL, input="A JSON object with a key 'ok'.", max_output_tokens=40, temperature=0,
            text={"format": {"type": "json_schema", "name": "ok", "strict": True, "schema": {
                "type": "object", "properties": {"ok": {"type": "boolean"}},
                "required": ["ok"], "additionalProperties": False}}},
        )
        expect(isinstance(json.loads(r.output_text)["ok"], bool), r.output_text)

    def get_list_delete():
        r = client.responses.create(model=e2e.MODEL, input=QUESTION, max_output_tokens=4)
        got = client.responses.retrieve(r.id)
        expect(got.id == r.id and got.output_text == r.output_text, got)
        items = client.responses.input_items.list(r.id)
        expect(len(items.data) == 1 and items.data[0].content[0].text == QUESTION, items)
        client.responses.delete(r.id)
        for call in (lambda: client.responses.retrieve(r.id), lambda: client.responses.delete(r.id)):
            try:
                call()
            except openai.NotFoundError:
                pass
            else:
                raise AssertionError("a deleted response was still there")
        gone = client.responses.create(model=e2e.MODEL, input=QUESTION, max_output_tokens=2, store=False)
        try:
            client.responses.create(model=e2e.MODEL, input="x", previous_response_id=gone.id)
        except openai.NotFoundError as e:
            expect("store: false" in str(e), e)
        else:
            raise AssertionError("previous_response_id to an unstored response was taken")

    def refused():
        for kwargs, needle in [
            ({"background": True}, "background"),
            ({"reasoning": {"summary": "auto"}}, "reasoning.summary"),
            ({"tools": [{"type": "web_search"}]}, "function tools"),
            ({"input": [{"role": "user", "content": [
                {"type": "input_image", "image_url": "https://example.com/a.png"}]}]}, "input_image"),
        ]:
            body = {"model": e2e.MODEL, "input": "hi", "max_output_tokens": 2, **kwargs}
            try:
                client.responses.create(**body)
            except openai.BadRequestError as e:
                expect(needle in str(e), e)
            else:
                raise AssertionError(f"{kwargs} was taken")
        bad = OpenAI(base_url=base + "/v1", api_key="wrong", timeout=30, max_retries=0)
        try:
            bad.responses.create(model=e2e.MODEL, input="hi")
        except openai.AuthenticationError:
            pass
        else:
            raise AssertionError("a wrong key was taken")

    try:
        check("responses.create (metadata, usage)", plain)
        if "plain" in state:
            check("responses.create previous_response_id, instructions", chained)
        check("responses.create stream=True (output_text.delta)", streamed)
        check("responses.create tools: named, round trip, streamed, auto refused", tools)
        check("responses.parse / text.format json_schema", structured)
        check("responses.retrieve, input_items.list, delete; store=False", get_list_delete)
        check("refused fields (400) and keys (401)", refused)
    finally:
        code = e2e.stop_server(proc)
    e2e.report("responses e2e", code, log)


if __name__ == "__main__":
    main()
