#!/usr/bin/env python3
"""Random-weight checkpoints of real model shapes at full size, for issue 25's speed runs.

Two writers, both streaming (a few tens of MB in memory whatever the model size):

    scale_gguf.py llama --size 1b|3b|8b --tokenizer-from SMOL.gguf --out F16.gguf [--type q8_0]
    scale_gguf.py opt13b --out DIR [--layers N] [--gpt2-tokenizer DIR]
    scale_gguf.py bytes FILE.gguf     # JSON: weight bytes, and bytes one decoded token reads

`llama` writes an F16 GGUF of Llama-3.2-1B, Llama-3.2-3B or Llama-3.1-8B's layer
shapes (the numbers of each model's config.json on the Hub, as in kiln's
`kiln_model::dummy::SHAPES`), with the default model's tokenizer (SmolLM2's 49152
tokens) padded to Llama 3's 128256 ids with unused `[PAD<id>]` tokens, the way
llama.cpp's converter pads a short vocabulary; llama-quantize makes the other formats
from it. 1B and 3B tie the output head to the embedding (no output.weight), as the
real models do. `--type q8_0` writes the matrices as random Q8_0 blocks instead
(about half the disk of F16: the 8B source is 8.5 GB, not 16), for a disk that
cannot hold the F16 source beside the formats made from it.

`opt13b` writes facebook/opt-13b's shape as the Hub lays it out: config.json
(the Hub's numbers), fp16 safetensors in three shards named
model-0000N-of-00003.safetensors with model.safetensors.index.json, tensors under
the Hub checkpoint's names (`decoder.layers.N.self_attn.q_proj.weight`, ... : the
OPTModel names with no `model.` prefix, which transformers and kiln both accept; a
1-layer copy loads in transformers' OPTForCausalLM with no missing or unexpected key),
and GPT-2's byte-level BPE tokenizer as tokenizer.json, built from GPT-2's
encoder.json and vocab.bpe (OPT's tokenizer is the same BPE with its ids in fairseq's
order and a `</s>` BOS: the ids differ, which random weights do not notice). `--layers` writes fewer layers (for checking the writer
on a small disk); the default 40 is the real model, 25.7 GB.

Weights are random F16 bit patterns with the exponent held so every value is finite
and 2^-8 <= |w| < 2^-6 (about the usual 0.02 initializer), drawn once into a 32 MiB
pool that every piece is copied from at a random offset, so writing is bound by the
disk. Norm weights are ones, biases zero.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np

try:
    import gguf
except ImportError:  # pragma: no cover - a message, not a traceback
    sys.exit("scale_gguf.py: the `gguf` package is missing; run it with ~/.cache/kiln/venv-golden/bin/python "
             "or a venv with `pip install gguf numpy`")

# Hub config.json numbers: hidden, intermediate, layers, heads, kv heads, tied, rope scaling factor.
LLAMA = {
    "1b": dict(label="llama3.2-1b", hidden=2048, ff=8192, layers=16, heads=32, kv=8, tied=True, factor=32.0),
    "3b": dict(label="llama3.2-3b", hidden=3072, ff=8192, layers=28, heads=24, kv=8, tied=True, factor=32.0),
    "8b": dict(label="llama3.1-8b", hidden=4096, ff=14336, layers=32, heads=32, kv=8, tied=False, factor=8.0),
}
LLAMA_VOCAB = 128256

# facebook/opt-13b config.json.
OPT13B = {
    "_name_or_path": "facebook/opt-13b",
    "activation_dropout": 0.0,
    "activation_function": "relu",
    "architectures": ["OPTForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 2,
    "do_layer_norm_before": True,
    "dropout": 0.1,
    "eos_token_id": 2,
    "ffn_dim": 20480,
    "hidden_size": 5120,
    "init_std": 0.02,
    "layerdrop": 0.0,
    "max_position_embeddings": 2048,
    "model_type": "opt",
    "num_attention_heads": 40,
    "num_hidden_layers": 40,
    "output_projection": True,
    "pad_token_id": 1,
    "prefix": "</s>",
    "torch_dtype": "float16",
    "transformers_version": "4.21.0.dev0",
    "use_cache": True,
    "vocab_size": 50272,
    "word_embed_proj_dim": 5120,
}

# Random values drawn once (32 MiB of f16) and written from a random offset for
# each piece: the weights' values do not change any speed, and drawing 13 billion
# fresh ones would take longer than writing them.
POOL = 1 << 24


def random_f16(n: int, rng: np.random.Generator) -> np.ndarray:
    """`n` finite f16 values, random sign and mantissa, 2^-8 <= |x| < 2^-6."""
    bits = rng.integers(0, 1 << 16, size=n, dtype=np.uint16)
    exp = (7 + ((bits >> 10) & 1)).astype(np.uint16) << 10
    return ((bits & 0x83FF) | exp).view(np.float16)


# Q8_0: a block is an f16 scale and 32 signed bytes.
Q8_BLOCK = 34


class RandomQ8:
    """Writes random Q8_0 blocks from a pool, each piece from a random offset:
    codes uniform in [-127, 127] and scales 2^-13 (|w| < 2^-6, as RandomF16)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        n = POOL // Q8_BLOCK
        blocks = np.empty((n, Q8_BLOCK), dtype=np.uint8)
        blocks[:, :2] = np.full(n, 2.0 ** -13, dtype=np.float16).view(np.uint8).reshape(n, 2)
        blocks[:, 2:] = self.rng.integers(-127, 128, size=(n, 32), dtype=np.int8).view(np.uint8)
        self.pool = blocks.reshape(-1)
        self.blocks = n

    def write(self, fout, n: int) -> int:
        """Writes the blocks of `n` values (a multiple of 32); returns the bytes."""
        want = n // 32
        done = 0
        while done < want:
            start = int(self.rng.integers(0, self.blocks))
            k = min(self.blocks - start, want - done)
            self.pool[start * Q8_BLOCK:(start + k) * Q8_BLOCK].tofile(fout)
            done += k
        return want * Q8_BLOCK


class RandomF16:
    """Writes random f16 values from a pool, each piece from a random offset."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.pool = random_f16(POOL, self.rng)

    def write(self, fout, n: int) -> int:
        done = 0
        while done < n:
            start = int(self.rng.integers(0, POOL))
            k = min(POOL - start, n - done)
            self.pool[start:start + k].tofile(fout)
            done += k
        return n * 2


def tokenizer_fields(path: Path, vocab: int) -> list[tuple[str, object, gguf.GGUFValueType, object]]:
    """The tokenizer.* key/values of a GGUF, its vocabulary padded to `vocab` ids."""
    reader = gguf.GGUFReader(path)
    out = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        val = field.contents()
        out.append([key, val, vtype, sub])
    tokens = next((f for f in out if f[0] == "tokenizer.ggml.tokens"), None)
    if tokens is None:
        sys.exit(f"scale_gguf.py: {path} has no tokenizer.ggml.tokens")
    have = len(tokens[1])
    if have > vocab:
        sys.exit(f"scale_gguf.py: the tokenizer has {have} tokens, more than the shape's {vocab}")
    pad = range(have, vocab)
    for f in out:
        if f[0] == "tokenizer.ggml.tokens":
            f[1] = list(f[1]) + [f"[PAD{i}]" for i in pad]
        elif f[0] == "tokenizer.ggml.token_type":
            f[1] = list(f[1]) + [int(gguf.TokenType.UNUSED)] * len(pad)
        elif f[0] == "tokenizer.ggml.scores":
            f[1] = list(f[1]) + [0.0] * len(pad)
    return [tuple(f) for f in out]


def llama_plan(s: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """Every tensor as (name, numpy shape, kind) in file order; kind 'ones' or 'f16'."""
    h, ff = s["hidden"], s["ff"]
    hd = h // s["heads"]
    q, kv = s["heads"] * hd, s["kv"] * hd
    plan = [("token_embd.weight", (LLAMA_VOCAB, h), "f16")]
    for i in range(s["layers"]):
        b = f"blk.{i}."
        plan += [
            (b + "attn_norm.weight", (h,), "ones"),
            (b + "attn_q.weight", (q, h), "f16"),
            (b + "attn_k.weight", (kv, h), "f16"),
            (b + "attn_v.weight", (kv, h), "f16"),
            (b + "attn_output.weight", (h, q), "f16"),
            (b + "ffn_norm.weight", (h,), "ones"),
            (b + "ffn_gate.weight", (ff, h), "f16"),
            (b + "ffn_up.weight", (ff, h), "f16"),
            (b + "ffn_down.weight", (h, ff), "f16"),
        ]
    plan.append(("output_norm.weight", (h,), "ones"))
    if not s["tied"]:
        plan.append(("output.weight", (LLAMA_VOCAB, h), "f16"))
    return plan


def write_llama(args: argparse.Namespace) -> None:
    s = LLAMA[args.size]
    out = Path(args.out)
    part = out.with_name(out.name + ".part")
    tok = tokenizer_fields(Path(args.tokenizer_from), LLAMA_VOCAB)
    plan = llama_plan(s)
    hd = s["hidden"] // s["heads"]

    w = gguf.GGUFWriter(part, "llama")
    w.add_name(f"{s['label']} random weights")
    w.add_description(f"random weights (seed {args.seed}) of {s['label']}'s shapes; written by kiln "
                      "scripts/bench/scale_gguf.py for speed runs")
    q8 = args.type == "q8_0"
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if q8 else gguf.LlamaFileType.MOSTLY_F16)
    w.add_uint32("llama.block_count", s["layers"])
    w.add_uint32("llama.context_length", 131072)
    w.add_uint32("llama.embedding_length", s["hidden"])
    w.add_uint32("llama.feed_forward_length", s["ff"])
    w.add_uint32("llama.attention.head_count", s["heads"])
    w.add_uint32("llama.attention.head_count_kv", s["kv"])
    w.add_uint32("llama.attention.key_length", hd)
    w.add_uint32("llama.attention.value_length", hd)
    w.add_uint32("llama.rope.dimension_count", hd)
    w.add_float32("llama.rope.freq_base", 500000.0)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint32("llama.vocab_size", LLAMA_VOCAB)
    for key, val, vtype, sub in tok:
        w.add_key_value(key, val, vtype, sub_type=sub)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    def ty(kind: str) -> gguf.GGMLQuantizationType:
        if kind == "ones":
            return gguf.GGMLQuantizationType.F32
        return gguf.GGMLQuantizationType.Q8_0 if q8 else gguf.GGMLQuantizationType.F16

    def nbytes(shape: tuple[int, ...], kind: str) -> int:
        n = int(np.prod(shape))
        if kind == "ones":
            return n * 4
        return n // 32 * Q8_BLOCK if q8 else n * 2

    for name, shape, kind in plan:
        w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes(shape, kind), raw_dtype=ty(kind))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    # Tensor data, streamed: each tensor starts on the file's alignment and is padded
    # to it, as GGUFWriter.write_tensor_data does, written in pieces.
    fout = w.fout[0]
    rng = RandomQ8(args.seed) if q8 else RandomF16(args.seed)
    total = sum(nbytes(sh, k) for _, sh, k in plan)
    done = 0
    for name, shape, kind in plan:
        w.write_padding(fout, fout.tell())
        n = int(np.prod(shape))
        if kind == "ones":
            np.ones(n, dtype=np.float32).tofile(fout)
            written = n * 4
        else:
            written = rng.write(fout, n)
        w.write_padding(fout, written)
        done += written
        if name.endswith("ffn_down.weight") or name == "token_embd.weight":
            print(f"scale_gguf.py: {name} ({done / 2**30:.1f} of {total / 2**30:.1f} GiB)", file=sys.stderr)
    w.close()
    part.rename(out)
    print(json.dumps({"file": str(out), "bytes": out.stat().st_size, **count(out)}))


def opt_plan(layers: int) -> list[tuple[str, tuple[int, ...], str]]:
    """facebook/opt-13b's tensors under the Hub checkpoint's names, in its order."""
    c = OPT13B
    h, ff = c["hidden_size"], c["ffn_dim"]
    plan = [
        ("decoder.embed_tokens.weight", (c["vocab_size"], c["word_embed_proj_dim"]), "f16"),
        ("decoder.embed_positions.weight", (c["max_position_embeddings"] + 2, h), "f16"),
        ("decoder.final_layer_norm.weight", (h,), "ones"),
        ("decoder.final_layer_norm.bias", (h,), "zeros"),
    ]
    for i in range(layers):
        b = f"decoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            plan += [(b + f"self_attn.{proj}.weight", (h, h), "f16"), (b + f"self_attn.{proj}.bias", (h,), "zeros")]
        plan += [
            (b + "self_attn_layer_norm.weight", (h,), "ones"),
            (b + "self_attn_layer_norm.bias", (h,), "zeros"),
            (b + "fc1.weight", (ff, h), "f16"),
            (b + "fc1.bias", (ff,), "zeros"),
            (b + "fc2.weight", (h, ff), "f16"),
            (b + "fc2.bias", (h,), "zeros"),
            (b + "final_layer_norm.weight", (h,), "ones"),
            (b + "final_layer_norm.bias", (h,), "zeros"),
        ]
    return plan


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...], str]], rng: RandomF16) -> int:
    """One fp16 safetensors shard, its header first, then each tensor streamed."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in tensors:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, kind in tensors:
            n = int(np.prod(shape))
            if kind == "f16":
                rng.write(f, n)
            else:
                np.full(n, 1.0 if kind == "ones" else 0.0, dtype=np.float16).tofile(f)
    part.rename(path)
    return offset


def gpt2_tokenizer(src: Path, out: Path) -> None:
    """OPT's tokenizer (GPT-2's byte-level BPE) as tokenizer.json, from encoder.json and vocab.bpe."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    except ImportError:
        sys.exit("scale_gguf.py: the `tokenizers` package is needed for OPT's tokenizer.json "
                 "(run with ~/.cache/kiln/venv-golden/bin/python)")
    vocab = json.loads((src / "encoder.json").read_text())
    merges = [tuple(line.split()) for line in (src / "vocab.bpe").read_text().splitlines()[1:] if line.strip()]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    tok.save(str(out))


def write_opt(args: argparse.Namespace) -> None:
    if not 1 <= args.layers <= 40:
        sys.exit("scale_gguf.py: --layers must be 1 to 40 (OPT-13B has 40)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = opt_plan(args.layers)
    # Three shards of about equal size, split between layers as the Hub's are:
    # whole units (the embeddings and final norm, then each layer) go to the shard
    # whose third of the bytes they start in.
    units: list[list] = []
    unit_of = None
    for t in plan:
        unit = t[0].split(".")[2] if t[0].startswith("decoder.layers.") else "top"
        if unit != unit_of:
            units.append([])
            unit_of = unit
        units[-1].append(t)
    total = sum(int(np.prod(sh)) * 2 for _, sh, _ in plan)
    shards: list[list] = [[], [], []]
    done = 0
    for u in units:
        shards[min(2, done * 3 // total)].extend(u)
        done += sum(int(np.prod(sh)) * 2 for _, sh, _ in u)
    shards = [s for s in shards if s]
    n_shards = len(shards)
    rng = RandomF16(args.seed)
    weight_map = {}
    for i, tensors in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n_shards:05d}.safetensors"
        write_safetensors(out / name, tensors, rng)
        weight_map.update({t[0]: name for t in tensors})
        print(f"scale_gguf.py: {name} ({(out / name).stat().st_size / 2**30:.1f} GiB)", file=sys.stderr)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    cfg = dict(OPT13B, num_hidden_layers=args.layers)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1}, indent=2) + "\n")
    gpt2_tokenizer(Path(args.gpt2_tokenizer), out / "tokenizer.json")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>",
         "add_bos_token": True, "model_max_length": 1000000000000000019884624838656}, indent=2) + "\n")
    print(json.dumps({"dir": str(out), "shards": n_shards, "bytes": total, "layers": args.layers}))


def count(path: Path) -> dict:
    """Weight bytes of a GGUF and the bytes one decoded token reads: every tensor but
    the token embedding (one row of it), which a tied model reads whole as its head."""
    r = gguf.GGUFReader(path)
    total = per_token = embed = 0
    has_output = False
    for t in r.tensors:
        b = int(t.n_bytes)
        total += b
        if t.name == "token_embd.weight":
            embed = b
        else:
            per_token += b
            has_output |= t.name == "output.weight"
    return {"total_bytes": total, "bytes_per_token": per_token if has_output else per_token + embed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pl = sub.add_parser("llama", help="write a Llama-shaped F16 GGUF")
    pl.add_argument("--size", choices=sorted(LLAMA), required=True)
    pl.add_argument("--tokenizer-from", required=True, help="a GGUF whose tokenizer.* keys are copied")
    pl.add_argument("--seed", type=int, default=25)
    pl.add_argument("--out", required=True)
    pl.add_argument("--type", choices=["f16", "q8_0"], default="f16",
                    help="the matrices' encoding (q8_0: half the disk of f16)")
    po = sub.add_parser("opt13b", help="write the OPT-13B-shaped fp16 safetensors checkpoint")
    po.add_argument("--out", required=True)
    po.add_argument("--layers", type=int, default=40)
    po.add_argument("--seed", type=int, default=25)
    po.add_argument("--gpt2-tokenizer", default=os.path.expanduser("~/.cache/kiln/testdata/tokenizers/gpt2"),
                    help="a folder with GPT-2's encoder.json and vocab.bpe")
    pb = sub.add_parser("bytes", help="print a GGUF's weight bytes and bytes read per token as JSON")
    pb.add_argument("file")
    args = p.parse_args()
    if args.cmd == "llama":
        write_llama(args)
    elif args.cmd == "opt13b":
        write_opt(args)
    else:
        print(json.dumps(count(Path(args.file))))


if __name__ == "__main__":
    main()
