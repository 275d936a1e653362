#!/usr/bin/env python3
"""Expected renderings of gpt-oss's chat template (harmony), made by `transformers`.

The companion of chat_templates.py (its tools and tool-call turns are imported
from it) for gpt-oss, written to testdata/chat/gpt_oss.json. The template is
openai/gpt-oss-120b's as llama.cpp keeps a copy of it
(models/templates/openai-gpt-oss-120b.jinja of the llama-cpp-python 0.3.36
source package; gpt-oss-20b ships the same), fetched into the cache by
`scripts/fetch-assets.sh --tests` as
$KILN_CACHE/testdata/tokenizers/gpt_oss/chat_template.jinja. It reads no
special-token variables, so it is rendered through the cached qwen3 tokenizer
with `apply_chat_template(..., chat_template=<it>)`.

The template writes today's date (`strftime_now("%Y-%m-%d")`): the renderings
keep it as `Current date: {DATE}`, and the test puts kiln's date in the same
place.

Run (from the repository root; a few seconds):

    scripts/fetch-assets.sh --tests
    HF_HUB_OFFLINE=1 ${KILN_CACHE:-$HOME/.cache/kiln}/venv-golden/bin/python \\
        scripts/golden/chat_templates_gpt_oss.py [--out testdata/chat]

Deterministic: a rerun rewrites a byte-identical file.
"""

import argparse
import hashlib
import json
import platform
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chat_templates as ct  # noqa: E402  (sets the offline environment variables too)

# A richer tool than chat_templates.TOOLS: integers, arrays, optional fields,
# defaults and a nested object, which the template writes as TypeScript types.
SEARCH = {
    "type": "function",
    "function": {
        "name": "search_flights",
        "description": "Find flights between two airports.",
        "parameters": {
            "type": "object",
            "properties": {
                "origin": {"type": "string", "description": "IATA code"},
                "destination": {"type": "string"},
                "passengers": {"type": "integer", "default": 1},
                "cabins": {"type": "array", "items": {"type": "string"}},
                "flexible": {"type": "boolean"},
                "window": {
                    "type": "object",
                    "properties": {"from": {"type": "string"}, "days": {"type": "number"}},
                    "required": ["from"],
                },
            },
            "required": ["origin", "destination"],
        },
    },
}
NO_ARGS = {"type": "function", "function": {"name": "now", "description": "The time."}}
A_CALL_THINKING = dict(ct.A_CALL, thinking="The user wants Paris weather; call get_weather.")

# (case, messages, tools, add_generation_prompt values, kwargs)
CASES = [
    ("user_only", [ct.U1], None, (False, True), {}),
    ("system_user", [ct.SYS, ct.U1], None, (False, True), {}),
    ("developer_user_effort", [{"role": "developer", "content": "Be brief."}, ct.U1], None, (True,),
     {"reasoning_effort": "high", "model_identity": "You are kiln's test model."}),
    ("multi_turn", [ct.SYS, ct.U1, ct.A1, ct.U2], None, (True,), {}),
    ("ends_with_assistant", [ct.U1, ct.A1, ct.U2, ct.A_LAST], None, (False,), {}),
    ("whitespace_unicode", [ct.U_WS], None, (True,), {}),
    ("tools_user_only", [ct.U_W], ct.TOOLS + [SEARCH, NO_ARGS], (True,), {}),
    ("tools_system_user", [ct.SYS, ct.U_W], ct.TOOLS, (True,), {}),
    ("tools_call_and_result", [ct.U_W, ct.A_CALL, ct.T_RES], ct.TOOLS, (True,), {}),
    ("tools_result_answered", [ct.SYS, ct.U_W, ct.A_CALL, ct.T_RES, ct.A_FINAL, ct.U2], ct.TOOLS, (True,), {}),
    # The analysis before a call, sent back as `thinking`: replayed while no
    # final answer follows the call, dropped once one does.
    ("tools_call_with_thinking", [ct.U_W, A_CALL_THINKING, ct.T_RES], ct.TOOLS, (True,), {}),
    ("tools_thinking_answered", [ct.U_W, A_CALL_THINKING, ct.T_RES, ct.A_FINAL, ct.U2], ct.TOOLS, (True,), {}),
]

DATE = re.compile(r"Current date: \d{4}-\d{2}-\d{2}\n")


def main() -> int:
    repo_root = Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(repo_root / "testdata" / "chat"), help="output folder")
    ap.add_argument("--tokenizers", default=str(ct.cache_dir()), help="where fetch-assets.sh put them")
    args = ap.parse_args()

    import jinja2
    import transformers
    from transformers import AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    tokdir = Path(args.tokenizers)
    path = tokdir / "gpt_oss" / "chat_template.jinja"
    if not path.is_file() or not (tokdir / "qwen3").is_dir():
        print(f"chat: {path} or the qwen3 tokenizer missing; run scripts/fetch-assets.sh --tests", file=sys.stderr)
        return 1
    template = path.read_text()
    tok = AutoTokenizer.from_pretrained(str(tokdir / "qwen3"))
    records = []
    for case, messages, tools, agps, kwargs in CASES:
        for agp in agps:
            text = tok.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=agp, chat_template=template, **kwargs
            )
            if len(DATE.findall(text)) != 1:
                print(f"chat: {case}: no single 'Current date' line", file=sys.stderr)
                return 1
            rec = {
                "template": "gpt_oss",
                "case": case,
                "messages": messages,
                "add_generation_prompt": agp,
                "kwargs": kwargs,
                "expected": DATE.sub("Current date: {DATE}\n", text),
            }
            if tools is not None:
                rec["tools"] = tools
            records.append(rec)
    doc = {
        "generator": "scripts/golden/chat_templates_gpt_oss.py",
        "versions": {
            "transformers": transformers.__version__,
            "jinja2": jinja2.__version__,
            "python": platform.python_version(),
        },
        "call": "tokenizer.apply_chat_template(messages, tools=..., tokenize=False, add_generation_prompt=..., "
        "chat_template=<gpt-oss's template>, **kwargs), today's date replaced by {DATE}",
        "template": {
            "source": "llama-cpp-python 0.3.36 sdist, vendor/llama.cpp/models/templates/openai-gpt-oss-120b.jinja; "
            "$KILN_CACHE/testdata/tokenizers/gpt_oss/chat_template.jinja after scripts/fetch-assets.sh --tests",
            "chat_template_sha256": hashlib.sha256(template.encode("utf-8")).hexdigest(),
        },
        "records": records,
    }
    out = Path(args.out) / "gpt_oss.json"
    out.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"chat: wrote {len(records)} cases to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
