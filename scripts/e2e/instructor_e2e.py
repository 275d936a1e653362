#!/usr/bin/env python3
"""End-to-end test of kiln's /v1/chat/completions with `instructor`.

    python instructor_e2e.py path/to/kiln

Starts `kiln serve --port 0 --api-key ...` on the default model, then asks
instructor (over the official `openai` client) for a small pydantic model in
two modes: Mode.JSON_SCHEMA (instructor sends `response_format` with the
model's JSON schema) and Mode.TOOLS (a function tool named after the model
and a `tool_choice` naming it). The test is that the wire works and the
output validates: each answer is an instance of the model, the raw
completion is what that mode reads (JSON content, or one tool call named
after the model) and finished with "stop", and several seeds all validate.
Prints one line per check and exits non-zero if any failed. Run it with
scripts/e2e/run.sh.
"""

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import openai_e2e as e2e  # noqa: E402  (the shared server start and check helpers)
from openai_e2e import check, expect  # noqa: E402

import instructor
import openai
from openai import OpenAI
from pydantic import BaseModel, ConfigDict, Field

API_KEY = "e2e-instructor-key"
MODEL = "default"



class Person(BaseModel):
    """A tiny schema the 135M default model can fill in a few tokens
    (no other keys: `additionalProperties: false` in its JSON schema)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=150)


def start_server(binary):
    return e2e.start_server(binary, ("--kv-cache-mib", "128"), ready_s=120, key=API_KEY)


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    proc, base, log = start_server(sys.argv[1])
    print(f"kiln serve at {base} (instructor {instructor.__version__}, "
          f"openai {openai.__version__})", flush=True)
    raw = OpenAI(base_url=base + "/v1", api_key=API_KEY, timeout=120, max_retries=0)
    messages = [{"role": "user", "content": "Invent a person: a short name and an age."}]
    try:
        def ask(mode, seed):
            client = instructor.from_openai(raw, mode=mode)
            person, completion = client.chat.completions.create_with_completion(
                model=MODEL,
                response_model=Person,
                messages=messages,
                max_tokens=60,
                temperature=1.0,
                seed=seed,
                max_retries=1,
            )
            expect(isinstance(person, Person), repr(person))
            choice = completion.choices[0]
            expect(choice.finish_reason in ("stop", "tool_calls"), choice)
            return person, choice

        def json_schema():
            for seed in range(3):
                person, choice = ask(instructor.Mode.JSON_SCHEMA, seed)
                # The content is the JSON instructor validated, nothing else.
                v = json.loads(choice.message.content)
                expect(Person.model_validate(v).model_dump() == person.model_dump(), (v, person))
                expect(not choice.message.tool_calls, choice.message)

        def tools():
            for seed in range(3):
                person, choice = ask(instructor.Mode.TOOLS, seed)
                calls = choice.message.tool_calls or []
                expect(len(calls) == 1 and calls[0].function.name == "Person", choice.message)
                v = json.loads(calls[0].function.arguments)
                expect(Person.model_validate(v).model_dump() == person.model_dump(), (v, person))
                # No tool-call markup leaks into the content.
                expect(not (choice.message.content or "").strip(), choice.message.content)

        check("Mode.JSON_SCHEMA: 3 seeds, each a valid Person", json_schema)
        check("Mode.TOOLS: 3 seeds, one Person tool call each", tools)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(f"{e2e.passes} passed, {len(e2e.failures)} failed", flush=True)
    if e2e.failures:
        print("".join(log[-40:]), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
