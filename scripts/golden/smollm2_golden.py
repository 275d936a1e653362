#!/usr/bin/env python3
"""Reference ("golden") outputs of SmolLM2-135M-Instruct for kiln's tests.

What it computes
----------------
Using Hugging Face `transformers` on CPU in float32, from the exact GGUF file
kiln embeds (SmolLM2-135M-Instruct.Q4_1.gguf, dequantized to float32 by
transformers/gguf), for each of four fixed prompts:

  * the prompt's token ids (transformers' tokenizer built from the GGUF);
  * one forward pass over the whole prompt:
      - the full logits row of the LAST position, raw little-endian float32
        (vocab_size values), in smollm2_p{i}_last_logits.f32;
      - for EVERY position, the argmax token id and the max logit;
  * greedy generation of exactly 32 new tokens (do_sample=False, no
    repetition penalty, EOS ignored), with the max logit of every step, the
    gap between the best and second-best logit of every step, and the decoded
    text (special tokens skipped).

Everything goes into smollm2.json (compact, floats written as the exact value
of the float32, i.e. repr of the float32 widened to a double), next to the
.f32 files and a README.md, in testdata/golden/ by default.

Checks made along the way (the script fails if one does not hold):
  * the model file's sha256 is the pinned one;
  * the model is what kiln expects (30 layers, dim 576, 9/3 heads, vocab 49152,
    tied embeddings);
  * generation produced exactly 32 tokens;
  * the first generated id equals the argmax of the last prompt position, and
    generate()'s first-step logits equal the single forward pass' last row;
  * a teacher-forced forward pass over prompt + generated tokens gives the same
    argmax at every generated step as the KV-cached greedy loop (a disagreement
    is only allowed on a near-tie and is reported);
  * the chat prompt's answer mentions Paris.

Tokenizer note: the GGUF says tokenizer.ggml.pre = "smollm". llama.cpp (and
the model's original tokenizer.json) split every digit on its own before the
GPT-2 byte-level regex; transformers' GGUF converter does not know "smollm" and
falls back to the plain GPT-2 regex. This script therefore installs the
model's original pre-tokenizer (Digits(individual_digits=True) followed by
ByteLevel(use_regex=True)) and records that in the JSON, together with whether
the stock transformers tokenizer would have given the same ids (for these
prompts it does: the vocabulary has no token joining a digit to anything).

Setup (once; CPU only, the PyPI torch wheel also pulls CUDA packages, ~3 GB):

    python3 -m venv ${KILN_CACHE:-$HOME/.cache/kiln}/venv-golden
    ${KILN_CACHE:-$HOME/.cache/kiln}/venv-golden/bin/pip install -r scripts/golden/requirements.txt
    scripts/fetch-assets.sh        # puts the model in the cache

Run (from the repository root; about a minute on 2 cores):

    HF_HUB_OFFLINE=1 ${KILN_CACHE:-$HOME/.cache/kiln}/venv-golden/bin/python \
        scripts/golden/smollm2_golden.py [--out testdata/golden]

The outputs are deterministic: a rerun with the same package versions
rewrites byte-identical .json and .f32 files (only README.md's date moves).
Nothing is fetched from the network: the model and tokenizer come from the
local GGUF file only.
"""

import argparse
import datetime
import hashlib
import json
import logging
import os
import platform
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
VOCAB_SIZE = 49152
NEW_TOKENS = 32

BREAD = (
    "Bread is one of the oldest prepared foods. Archaeologists have found charred "
    "crumbs in northeastern Jordan that are roughly 14,000 years old, baked by "
    "hunter-gatherers from wild wheat, barley and plant roots. When farming spread "
    "across the Fertile Crescent, people began to grow grain on purpose, and flat "
    "loaves cooked on hot stones became a daily staple. The ancient Egyptians are "
    "often credited with leavened bread: dough left to stand caught wild yeasts from "
    "the air, and the loaves rose. Greek and Roman bakers refined the craft, building "
    "large public ovens and milling flour ever more finely. In medieval Europe the "
    "color of a loaf signaled social rank, because white bread made from sifted flour "
    "was expensive. The industrial age brought steel roller mills, commercial yeast "
    "and sliced bread, and today"
)

# (name, text, chat)
PROMPTS = [
    ("capital_plain", "The capital of France is", False),
    ("capital_chat", "What is the capital of France?", True),
    ("japanese", "吾輩は猫である。名前はまだ無い。", False),
    ("bread_paragraph", BREAD, False),
]


def default_model_path() -> Path:
    # Same cache location as scripts/fetch-assets.sh.
    cache = os.environ.get("KILN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "kiln"
    )
    return Path(cache) / "models" / MODEL_FILE


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def f32(x) -> float:
    """A float32 value as the Python float (double) that holds it exactly; json writes its repr."""
    import numpy as np

    return float(np.float32(x))


def main() -> int:
    repo_root = Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(repo_root / "testdata" / "golden"), help="output folder")
    ap.add_argument("--model", default=str(default_model_path()), help="path of the GGUF file")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (fixed for reproducibility)")
    ap.add_argument("--date", default=datetime.date.today().isoformat(), help="date written in README.md")
    args = ap.parse_args()

    model_path = Path(args.model)
    out = Path(args.out)
    if not model_path.is_file():
        print(f"golden: {model_path} not found; run scripts/fetch-assets.sh first", file=sys.stderr)
        return 1
    print(f"golden: checking sha256 of {model_path}", flush=True)
    digest = sha256_of(model_path)
    if digest != MODEL_SHA256:
        print(f"golden: {model_path} has sha256 {digest}, expected {MODEL_SHA256}", file=sys.stderr)
        return 1

    # Keep every warning so they can be reported at the end.
    logging.captureWarnings(True)
    caught = []
    warnings.simplefilter("always")
    orig_showwarning = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        caught.append(f"{category.__name__}: {message}")
        orig_showwarning(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning

    import numpy as np
    import torch
    import transformers
    import gguf
    from tokenizers import pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    transformers.utils.logging.disable_progress_bar()

    # --- tokenizer -------------------------------------------------------------------------
    reader = gguf.GGUFReader(str(model_path))
    pre_field = reader.fields.get("tokenizer.ggml.pre")
    gguf_pre = pre_field.contents() if pre_field is not None else None
    bos_field = reader.fields.get("tokenizer.ggml.add_bos_token")
    gguf_add_bos = bool(bos_field.contents()) if bos_field is not None else None
    has_output_tensor = any(t.name == "output.weight" for t in reader.tensors)
    del reader

    tok = AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)
    stock_tok = AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)
    stock_pre = json.loads(stock_tok.backend_tokenizer.to_str()).get("pre_tokenizer")
    pre_override = None
    if gguf_pre == "smollm":
        # llama.cpp's "smollm": "\p{N}" isolated, then the GPT-2 regex; identical to the
        # model's original tokenizer.json pre-tokenizer below.
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
        pre_override = json.loads(tok.backend_tokenizer.to_str())["pre_tokenizer"]
    if len(tok) != VOCAB_SIZE:
        print(f"golden: tokenizer has {len(tok)} tokens, expected {VOCAB_SIZE}", file=sys.stderr)
        return 1

    # transformers adds a BOS only if the post-processor does; for this GGUF (add_bos_token
    # false) it should not. Find out rather than assume.
    probe = tok("The", add_special_tokens=True)["input_ids"]
    probe_plain = tok("The", add_special_tokens=False)["input_ids"]
    transformers_adds_bos = probe != probe_plain
    print(
        f"golden: tokenizer.ggml.pre={gguf_pre!r}, gguf add_bos_token={gguf_add_bos}, "
        f"transformers adds special tokens around text: {transformers_adds_bos} "
        f"(bos={tok.bos_token!r}/{tok.bos_token_id}, eos={tok.eos_token!r}/{tok.eos_token_id})",
        flush=True,
    )

    # --- model -----------------------------------------------------------------------------
    model = AutoModelForCausalLM.from_pretrained(
        str(model_path.parent),
        gguf_file=model_path.name,
        dtype=torch.float32,
        attn_implementation="eager",
    )
    model.eval()
    model.to("cpu")
    cfg = model.config
    expect = dict(
        num_hidden_layers=30,
        hidden_size=576,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=VOCAB_SIZE,
    )
    for k, v in expect.items():
        if getattr(cfg, k) != v:
            print(f"golden: model config {k}={getattr(cfg, k)}, expected {v}", file=sys.stderr)
            return 1
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = head.data_ptr() == emb.data_ptr() or torch.equal(head, emb)
    if not has_output_tensor and not tied:
        print("golden: GGUF has no output.weight but lm_head differs from the embeddings", file=sys.stderr)
        return 1
    if any(p.dtype != torch.float32 for p in model.parameters()):
        print("golden: some parameters are not float32", file=sys.stderr)
        return 1

    gen_cfg = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=NEW_TOKENS,
        # No min_new_tokens: it would mask EOS out of the logits. With eos_token_id=None nothing
        # stops generation, so EOS can be picked like any other token and the count stays exact.
        repetition_penalty=1.0,
        temperature=None,
        top_k=None,
        top_p=None,
        eos_token_id=None,
        pad_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        use_cache=True,
        output_logits=True,
        return_dict_in_generate=True,
    )

    # generate() fills an eos_token_id of None from the model's own generation config (EOS =
    # <|im_end|>), which would stop early; clear it there too so EOS is just another token.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = tok.eos_token_id

    out.mkdir(parents=True, exist_ok=True)
    records = []
    failures = []
    notes = []
    for i, (name, text, chat) in enumerate(PROMPTS, start=1):
        if chat:
            rendered = tok.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            to_tokenize = rendered
            add_special = False  # the template already holds every special token
        else:
            rendered = None
            to_tokenize = text
            add_special = False  # no BOS: the GGUF says add_bos_token=false, as transformers does
        ids = tok(to_tokenize, add_special_tokens=add_special)["input_ids"]
        stock_ids = stock_tok(to_tokenize, add_special_tokens=add_special)["input_ids"]
        default_ids = tok(to_tokenize)["input_ids"]  # what a caller gets with the default flag
        if default_ids != ids and not chat:
            notes.append(f"p{i}: tokenizing with add_special_tokens=True gives different ids")

        input_ids = torch.tensor([ids], dtype=torch.long)
        attn = torch.ones_like(input_ids)

        # (a)+(b): one forward pass over the whole prompt.
        logits = model(input_ids=input_ids, attention_mask=attn, use_cache=False).logits[0]
        assert logits.dtype == torch.float32 and logits.shape == (len(ids), VOCAB_SIZE)
        last = logits[-1].contiguous().numpy().astype("<f4")
        logits_file = f"smollm2_p{i}_last_logits.f32"
        last.tofile(out / logits_file)
        maxv, argmax = logits.max(dim=-1)

        # (c): greedy generation, exactly NEW_TOKENS tokens.
        torch.manual_seed(0)
        gen = model.generate(input_ids=input_ids, attention_mask=attn, generation_config=gen_cfg)
        seq = gen.sequences[0].tolist()
        if seq[: len(ids)] != ids:
            failures.append(f"p{i}: generate() changed the prompt")
        greedy = seq[len(ids):]
        step_logits = torch.stack([s[0] for s in gen.logits])  # (steps, vocab), raw (unprocessed)
        if len(greedy) != NEW_TOKENS or step_logits.shape[0] != NEW_TOKENS:
            failures.append(f"p{i}: generated {len(greedy)} tokens / {step_logits.shape[0]} logit rows")
        top2 = step_logits.topk(2, dim=-1).values
        greedy_max = top2[:, 0]
        greedy_gap = top2[:, 0] - top2[:, 1]
        if step_logits.argmax(-1).tolist() != greedy:
            failures.append(f"p{i}: generated ids are not the argmax of their step logits")
        if greedy[0] != int(argmax[-1]):
            failures.append(f"p{i}: first generated id {greedy[0]} != last-position argmax {int(argmax[-1])}")
        first_diff = float((step_logits[0] - logits[-1]).abs().max())
        if first_diff > 1e-4:
            failures.append(f"p{i}: generate() step-0 logits differ from the forward pass by {first_diff}")

        # Teacher-forced check: one pass over prompt + generated tokens (no KV cache) must pick
        # the same token at every generated step, unless the step is a near-tie.
        full = torch.tensor([ids + greedy[:-1]], dtype=torch.long)
        tf = model(input_ids=full, attention_mask=torch.ones_like(full), use_cache=False).logits[0]
        tf_rows = tf[len(ids) - 1:]
        tf_argmax = tf_rows.argmax(-1).tolist()
        tf_diff = float((tf_rows - step_logits).abs().max())
        for s, (a, b) in enumerate(zip(tf_argmax, greedy)):
            if a != b:
                msg = f"p{i}: step {s}: teacher-forced argmax {a} != greedy {b} (gap {float(greedy_gap[s]):.3g})"
                (notes if float(greedy_gap[s]) < 1e-3 else failures).append(msg)

        greedy_text = tok.decode(greedy, skip_special_tokens=True)
        rec = {
            "name": name,
            "text": text,
            "chat": chat,
        }
        if chat:
            rec["rendered_text"] = rendered
        rec.update(
            {
                "add_special_tokens": add_special,
                "ids": ids,
                "ids_equal_stock_transformers": stock_ids == ids,
                "last_logits_file": logits_file,
                "argmax_per_position": argmax.tolist(),
                "max_logit_per_position": [f32(v) for v in maxv.tolist()],
                "greedy_ids": greedy,
                "greedy_max_logits": [f32(v) for v in greedy_max.tolist()],
                "greedy_top2_gap": [f32(v) for v in greedy_gap.tolist()],
                "greedy_text": greedy_text,
            }
        )
        records.append(rec)
        print(
            f"golden: p{i} {name}: {len(ids)} prompt ids, last argmax {int(argmax[-1])} "
            f"(max logit {f32(maxv[-1])!r}), min greedy top-2 gap {float(greedy_gap.min()):.4f}, "
            f"KV-cache vs full-pass max |diff| {tf_diff:.2e}",
            flush=True,
        )
        print(f"golden:    greedy text: {greedy_text!r}", flush=True)

    chat_rec = next(r for r in records if r["chat"])
    if "paris" not in chat_rec["greedy_text"].lower():
        failures.append(f"chat prompt's answer does not mention Paris: {chat_rec['greedy_text']!r}")

    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gguf": _dist_version("gguf"),
        "numpy": np.__version__,
        "tokenizers": _dist_version("tokenizers"),
        "python": platform.python_version(),
    }
    doc = {
        "model_sha256": MODEL_SHA256,
        "model_file": MODEL_FILE,
        "versions": versions,
        "dtype": "float32",
        "device": "cpu",
        "attn_implementation": "eager",
        "torch_threads": args.threads,
        "vocab_size": VOCAB_SIZE,
        "new_tokens": NEW_TOKENS,
        "logits_file_format": f"raw little-endian float32, {VOCAB_SIZE} values: logits of the last prompt position",
        "tokenizer": {
            "gguf_pre": gguf_pre,
            "gguf_add_bos_token": gguf_add_bos,
            "transformers_adds_bos": transformers_adds_bos,
            "stock_transformers_pre_tokenizer": stock_pre,
            "pre_tokenizer_used": pre_override or stock_pre,
            "note": (
                "transformers' GGUF converter does not map tokenizer.ggml.pre='smollm' and falls back to "
                "the GPT-2 byte-level regex; the ids here use the model's own pre-tokenizer (each digit "
                "isolated, then the GPT-2 regex), as llama.cpp does. ids_equal_stock_transformers tells "
                "whether stock transformers agrees for a prompt."
            )
            if pre_override
            else None,
        },
        "generation": {
            "do_sample": False,
            "repetition_penalty": 1.0,
            "eos_token_id": None,
            "max_new_tokens": NEW_TOKENS,
            "note": "pure argmax at every step; EOS (<|im_end|>, id 2) does not stop generation and may appear in greedy_ids",
        },
        "prompts": records,
    }
    with open(out / "smollm2.json", "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        f.write("\n")
    write_readme(out, versions, args.date, records, transformers_adds_bos)

    for n in notes:
        print(f"golden: note: {n}")
    if caught:
        print(f"golden: {len(caught)} warning(s) during the run:")
        for w in dict.fromkeys(caught):
            print(f"golden:   {w}")
    if failures:
        for fl in failures:
            print(f"golden: FAILED: {fl}", file=sys.stderr)
        return 1
    print(f"golden: wrote {out}/smollm2.json and {len(records)} logits files; all checks passed")
    return 0


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def write_readme(out: Path, versions: dict, date: str, records: list, adds_bos: bool) -> None:
    rows = "\n".join(
        f"| p{i} | {r['name']} | {'yes' if r['chat'] else 'no'} | {len(r['ids'])} | {r['last_logits_file']} |"
        for i, r in enumerate(records, start=1)
    )
    text = f"""# Golden outputs: SmolLM2-135M-Instruct

Reference outputs of kiln's default model, `SmolLM2-135M-Instruct.Q4_1.gguf`
(sha256 `{MODEL_SHA256}`), computed with Hugging Face
`transformers` on CPU in float32 (the GGUF dequantized to float32, eager attention,
{NEW_TOKENS} greedy tokens, EOS ignored). Generated on {date}.

| file | what |
| --- | --- |
| `smollm2.json` | per prompt: the token ids, the argmax id and max logit of every prompt position, the {NEW_TOKENS} greedy ids with each step's max logit and top-1/top-2 gap, the decoded greedy text; plus versions and tokenizer facts |
| `smollm2_p{{i}}_last_logits.f32` | the full logits row of the last prompt position of prompt i: raw little-endian float32, {VOCAB_SIZE} values |

| # | name | chat template | prompt ids | last-position logits |
| --- | --- | --- | --- | --- |
{rows}

No BOS is prepended: the GGUF says `add_bos_token` false, and transformers'
tokenizer adds {'one' if adds_bos else 'none'} by itself. The chat prompt is rendered with the
model's ChatML template (`add_generation_prompt=True`; the template adds its default
system message) and tokenized without adding special tokens again.

Greedy decoding is a pure argmax at every step with nothing stopping it, so
`greedy_ids` may hold `<|im_end|>` (id 2) and go on past it (the chat answer
ends with it after "Paris."); `greedy_text` skips special tokens. The greedy
step logits come from `generate()` (KV cache), so `greedy_max_logits[0]` can
differ from the forward pass' `max_logit_per_position[-1]` in the last bits.
The ids use the model's own pre-tokenizer (digits isolated, as llama.cpp's `smollm`),
which transformers' GGUF loader does not set up by itself; see `tokenizer` in the JSON.

Versions: torch {versions['torch']}, transformers {versions['transformers']},
gguf {versions['gguf']}, numpy {versions['numpy']}, tokenizers {versions['tokenizers']},
Python {versions['python']}.

Regenerate (from the repository root, after `scripts/fetch-assets.sh`):

```sh
python3 -m venv ${{KILN_CACHE:-$HOME/.cache/kiln}}/venv-golden
${{KILN_CACHE:-$HOME/.cache/kiln}}/venv-golden/bin/pip install -r scripts/golden/requirements.txt
HF_HUB_OFFLINE=1 ${{KILN_CACHE:-$HOME/.cache/kiln}}/venv-golden/bin/python scripts/golden/smollm2_golden.py --out testdata/golden
```

The script is deterministic: with the same versions it rewrites the `.json` and
`.f32` files byte for byte. Logits from a different implementation (kiln's own
kernels) will differ in the last bits: compare with a tolerance, and use the
recorded top-1/top-2 gaps to tell a real disagreement from a near-tie.
"""
    (out / "README.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
