#!/usr/bin/env python3
"""Writes an OPT-shaped fp16 safetensors checkpoint with random weights, for
measuring how kiln starts a large model on the CPU (scripts/bench/startup_large.sh).

    python3 scripts/bench/startup_opt.py OUT_DIR [--shape opt-2.7b|opt-6.7b|opt-13b|opt-125m]

The directory gets what a Hugging Face OPT checkpoint has: config.json,
generation_config.json, tokenizer.json (GPT-2's byte-level BPE, built from
the vocabulary and merges under ~/.cache/kiln/testdata/tokenizers/gpt2 when
they are there, else a byte-only vocabulary) and model.safetensors, with
the Hub's tensor names (`model.decoder.*`, the output tied to the token
embedding). The file is written tensor by tensor (the header first, then
each tensor's bytes as it is made), so the script holds one tensor at a
time, whatever the shape. Needs numpy (and `tokenizers` for the GPT-2
vocabulary): the golden venv has both.
"""

import argparse
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np

# name: (hidden, layers, heads, ffn); vocabulary, positions as OPT's.
SHAPES = {
    "opt-125m": (768, 12, 12, 3072),
    "opt-2.7b": (2560, 32, 32, 10240),
    "opt-6.7b": (4096, 32, 32, 16384),
    "opt-13b": (5120, 40, 40, 20480),
}
VOCAB = 50272
POSITIONS = 2048


def tensors(hidden, layers, ffn):
    """(name, shape) of every tensor, in the Hub's order and names."""
    out = [
        ("model.decoder.embed_tokens.weight", (VOCAB, hidden)),
        # OPT's learned positions are offset by 2.
        ("model.decoder.embed_positions.weight", (POSITIONS + 2, hidden)),
        ("model.decoder.final_layer_norm.weight", (hidden,)),
        ("model.decoder.final_layer_norm.bias", (hidden,)),
    ]
    for i in range(layers):
        p = f"model.decoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out.append((f"{p}self_attn.{proj}.weight", (hidden, hidden)))
            out.append((f"{p}self_attn.{proj}.bias", (hidden,)))
        out.append((f"{p}fc1.weight", (ffn, hidden)))
        out.append((f"{p}fc1.bias", (ffn,)))
        out.append((f"{p}fc2.weight", (hidden, ffn)))
        out.append((f"{p}fc2.bias", (hidden,)))
        for ln in ("self_attn_layer_norm", "final_layer_norm"):
            out.append((f"{p}{ln}.weight", (hidden,)))
            out.append((f"{p}{ln}.bias", (hidden,)))
    return out


def values(rng, name, shape):
    """Random fp16 values of a plausible scale: norms 1, everything else of
    magnitude in [1/128, 1/64) with a random sign and mantissa, so
    activations stay finite through every layer. Made from random bits (a
    sign, exponent 8 of 15's bias, ten random mantissa bits), not from a
    normal sampler: a 13B checkpoint is 13 billion values."""
    n = int(np.prod(shape))
    if "layer_norm.weight" in name:
        return np.ones(n, dtype=np.float16)
    bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)
    bits &= 0x83FF
    bits |= 8 << 10
    return bits.view(np.float16)


def write_safetensors(path, specs, rng):
    header, at = {}, 0
    for name, shape in specs:
        size = int(np.prod(shape)) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [at, at + size]}
        at += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_suffix(".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        done = 0
        for name, shape in specs:
            # Row blocks of at most 64 Mi values: one tensor is never held whole.
            rows = shape[0]
            per_row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            step = max(1, (64 << 20) // per_row) if len(shape) > 1 else rows
            for r in range(0, rows, step):
                k = min(step, rows - r)
                f.write(values(rng, name, (k * per_row,)).tobytes())
            before, done = done, done + int(np.prod(shape)) * 2
            if done >> 28 != before >> 28 or done == at:
                print(f"\r{done / 1e9:6.2f} / {at / 1e9:.2f} GB", end="", file=sys.stderr)
    print(file=sys.stderr)
    os.replace(tmp, path)
    return at


def tokenizer_json():
    gpt2 = Path.home() / ".cache/kiln/testdata/tokenizers/gpt2"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    if (gpt2 / "encoder.json").is_file() and (gpt2 / "vocab.bpe").is_file():
        vocab = json.loads((gpt2 / "encoder.json").read_text())
        lines = (gpt2 / "vocab.bpe").read_text().splitlines()
        merges = [tuple(l.split(" ")) for l in lines if l and not l.startswith("#version")]
    else:
        from tokenizers.pre_tokenizers import ByteLevel

        vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
        merges = []
    # OPT's ids: </s> = 2 (bos and eos), <pad> = 1; GPT-2's own ids shifted.
    specials = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    shifted = dict(specials)
    for tok, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        if tok not in shifted:
            shifted[tok] = len(shifted)
    tok = Tokenizer(models.BPE(vocab=shifted, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", special_tokens=[("</s>", 2)]
    )
    return tok.to_str()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="opt-2.7b")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    hidden, layers, heads, ffn = SHAPES[a.shape]
    a.out.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["OPTForCausalLM"],
        "model_type": "opt",
        "hidden_size": hidden,
        "word_embed_proj_dim": hidden,
        "ffn_dim": ffn,
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "max_position_embeddings": POSITIONS,
        "vocab_size": VOCAB,
        "do_layer_norm_before": True,
        "activation_function": "relu",
        "enable_bias": True,
        "layer_norm_elementwise_affine": True,
        "bos_token_id": 2,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "torch_dtype": "float16",
        "dropout": 0.1,
        "attention_dropout": 0.0,
    }
    (a.out / "config.json").write_text(json.dumps(config, indent=2))
    (a.out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1}, indent=2)
    )
    (a.out / "tokenizer.json").write_text(tokenizer_json())
    (a.out / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "</s>"})
    )
    size = write_safetensors(a.out / "model.safetensors", tensors(hidden, layers, ffn), np.random.default_rng(a.seed))
    print(f"{a.out}: {a.shape}, {size / 1e9:.2f} GB of fp16 weights")


if __name__ == "__main__":
    main()
