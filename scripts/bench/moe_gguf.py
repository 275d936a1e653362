#!/usr/bin/env python3
"""Random-weight mixture-of-experts GGUFs of real per-layer shapes, for speed runs.

Issue 23 point 5 compares kiln with llama.cpp on MoE models of the shapes people
run (Qwen3-30B-A3B, Mixtral-8x7B). Their real checkpoints do not fit this
machine's disk or network, and speed does not depend on the weights' values, so
this script writes files with the real hidden size, heads, expert count, experts
per token and expert width, fewer layers, and seeded random weights.

    moe_gguf.py write --shape qwen3moe --layers 8 --tokenizer-from SMOL.gguf --out F16.gguf
    moe_gguf.py active FILE.gguf      # JSON: total and per-token (active) weight bytes
    moe_gguf.py compare A.gguf B.gguf # are their tensors the same, byte for byte

`write` emits the matrices as F16, or (`--type q8_0`) as Q8_0 quantized from those
F16 values with ggml's reference rounding (gguf.quants, which llama-quantize matches
bit for bit), with F32 norms and routers as llama.cpp's converter writes them. It
streams to disk one expert matrix at a time, so memory stays at a few MB whatever
the file size. Q8_0 output saves the F16 intermediate (twice the Q8_0 size) where
disk is short; make other formats from either with llama-quantize. The tokenizer (vocabulary,
merges, special ids, chat template) is copied from another GGUF, the default model
SmolLM2-135M-Instruct's, so token ids and vocabulary size (49152) are those of a
real tokenizer and kiln and llama.cpp both accept the file.

`active` reads any GGUF of these architectures (any weight format) and counts the
bytes one decode step must read: every non-expert matrix, the chosen experts'
share (expert_used_count / expert_count) of each expert tensor, and one row of the
token embedding. moe.sh divides the machine's read bandwidth by it: the memory
floor of decode.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

try:
    import gguf
except ImportError:  # pragma: no cover - a message, not a traceback
    sys.exit("moe_gguf.py: the `gguf` package is missing; run it with ~/.cache/kiln/venv-golden/bin/python "
             "or a venv with `pip install gguf numpy`")


@dataclass(frozen=True)
class Shape:
    """One architecture's per-layer shape (the real model's values)."""

    arch: str  # GGUF general.architecture
    label: str  # file-name stem
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    experts: int
    experts_used: int
    expert_ff: int
    qk_norm: bool  # Qwen3's per-head query/key RMSNorm
    dense_ff: int | None  # the dense feed-forward width written apart from the experts' (Qwen3-MoE)
    rope_base: float
    rms_eps: float
    context: int


SHAPES = {
    # Qwen/Qwen3-30B-A3B config.json: 48 layers in the real model.
    "qwen3moe": Shape("qwen3moe", "qwen3moe-30b-a3b", hidden=2048, heads=32, kv_heads=4, head_dim=128,
                      experts=128, experts_used=8, expert_ff=768, qk_norm=True, dense_ff=6144,
                      rope_base=1_000_000.0, rms_eps=1e-6, context=40960),
    # mistralai/Mixtral-8x7B-v0.1 config.json: 32 layers in the real model; GGUF keeps
    # Mixtral under the `llama` architecture with expert tensors.
    "mixtral": Shape("llama", "mixtral-8x7b", hidden=4096, heads=32, kv_heads=8, head_dim=128,
                     experts=8, experts_used=2, expert_ff=14336, qk_norm=False, dense_ff=None,
                     rope_base=1_000_000.0, rms_eps=1e-5, context=32768),
}

# Standard deviation of the random matrices (the usual initializer range).
INIT_STD = 0.02


def tokenizer_fields(path: Path) -> list[tuple[str, object, gguf.GGUFValueType, gguf.GGUFValueType | None]]:
    """The tokenizer.* key/values of a GGUF, as (key, value, type, array element type)."""
    reader = gguf.GGUFReader(path)
    out = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        out.append((key, field.contents(), vtype, sub))
    if not any(k == "tokenizer.ggml.tokens" for k, *_ in out):
        sys.exit(f"moe_gguf.py: {path} has no tokenizer.ggml.tokens")
    return out


def tensor_plan(s: Shape, layers: int, vocab: int) -> list[tuple[str, tuple[int, ...], str]]:
    """Every tensor as (name, numpy shape = reversed GGUF dims, kind) in file order.

    kind: 'ones' (norm weights, F32), 'router' (F32 random), 'matrix' (F16 random),
    'experts' (F16 random, written one expert at a time).
    """
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    plan = [("token_embd.weight", (vocab, s.hidden), "matrix")]
    for i in range(layers):
        b = f"blk.{i}."
        plan += [
            (b + "attn_norm.weight", (s.hidden,), "ones"),
            (b + "attn_q.weight", (q, s.hidden), "matrix"),
            (b + "attn_k.weight", (kv, s.hidden), "matrix"),
            (b + "attn_v.weight", (kv, s.hidden), "matrix"),
            (b + "attn_output.weight", (s.hidden, q), "matrix"),
        ]
        if s.qk_norm:
            plan += [(b + "attn_q_norm.weight", (s.head_dim,), "ones"),
                     (b + "attn_k_norm.weight", (s.head_dim,), "ones")]
        plan += [
            (b + "ffn_norm.weight", (s.hidden,), "ones"),
            (b + "ffn_gate_inp.weight", (s.experts, s.hidden), "router"),
            (b + "ffn_gate_exps.weight", (s.experts, s.expert_ff, s.hidden), "experts"),
            (b + "ffn_down_exps.weight", (s.experts, s.hidden, s.expert_ff), "experts"),
            (b + "ffn_up_exps.weight", (s.experts, s.expert_ff, s.hidden), "experts"),
        ]
    plan += [("output_norm.weight", (s.hidden,), "ones"),
             ("output.weight", (vocab, s.hidden), "matrix")]
    return plan


def ggml_type_of(kind: str, weights: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """The stored type of a tensor kind: F32 for norms and routers, else `weights`."""
    return gguf.GGMLQuantizationType.F32 if kind in ("ones", "router") else weights


def nbytes_of(shape: tuple[int, ...], ty: gguf.GGMLQuantizationType) -> int:
    """Bytes of a tensor of numpy shape `shape` stored as `ty` (rows are whole blocks)."""
    block, size = gguf.GGML_QUANT_SIZES[ty]
    n = int(np.prod(shape))
    if shape[-1] % block:
        sys.exit(f"moe_gguf.py: rows of {shape[-1]} are not whole {ty.name} blocks of {block}")
    return n // block * size


def encode(x: np.ndarray, ty: gguf.GGMLQuantizationType) -> np.ndarray:
    """`x` (float32) stored as `ty`: F32 as is; F16 rounded; Q8_0 quantized from the
    F16-rounded values, as llama-quantize quantizes an F16 file."""
    if ty == gguf.GGMLQuantizationType.F32:
        return x
    h = x.astype(np.float16)
    if ty == gguf.GGMLQuantizationType.F16:
        return h
    return gguf.quants.quantize(h.astype(np.float32), ty)


def write(args: argparse.Namespace) -> None:
    s = SHAPES[args.shape]
    if args.layers < 1:
        sys.exit("moe_gguf.py: --layers must be at least 1")
    tok = tokenizer_fields(Path(args.tokenizer_from))
    vocab = next(len(v) for k, v, *_ in tok if k == "tokenizer.ggml.tokens")
    plan = tensor_plan(s, args.layers, vocab)
    out = Path(args.out)
    part = out.with_name(out.name + ".part")

    w = gguf.GGUFWriter(part, s.arch)
    a = s.arch
    w.add_name(f"{s.label} random weights, {args.layers} layers")
    w.add_description(f"random weights (seed {args.seed}, std {INIT_STD}) of {s.label}'s per-layer shapes, "
                      f"{args.layers} layers; written by kiln scripts/bench/moe_gguf.py for speed runs")
    weights = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[args.type]
    w.add_file_type({"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[args.type])
    w.add_uint32(f"{a}.block_count", args.layers)
    w.add_uint32(f"{a}.context_length", s.context)
    w.add_uint32(f"{a}.embedding_length", s.hidden)
    # Mixtral (llama arch) sizes its experts by feed_forward_length; Qwen3-MoE has
    # its own expert_feed_forward_length (feed_forward_length is the dense width,
    # unused by its MoE layers).
    if s.dense_ff is None:
        w.add_uint32(f"{a}.feed_forward_length", s.expert_ff)
    else:
        w.add_uint32(f"{a}.feed_forward_length", s.dense_ff)
        w.add_uint32(f"{a}.expert_feed_forward_length", s.expert_ff)
    w.add_uint32(f"{a}.attention.head_count", s.heads)
    w.add_uint32(f"{a}.attention.head_count_kv", s.kv_heads)
    w.add_uint32(f"{a}.attention.key_length", s.head_dim)
    w.add_uint32(f"{a}.attention.value_length", s.head_dim)
    w.add_uint32(f"{a}.rope.dimension_count", s.head_dim)
    w.add_float32(f"{a}.rope.freq_base", s.rope_base)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", s.rms_eps)
    w.add_uint32(f"{a}.expert_count", s.experts)
    w.add_uint32(f"{a}.expert_used_count", s.experts_used)
    w.add_uint32(f"{a}.vocab_size", vocab)
    for key, val, vtype, sub in tok:
        w.add_key_value(key, val, vtype, sub_type=sub)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    for name, shape, kind in plan:
        ty = ggml_type_of(kind, weights)
        w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes_of(shape, ty), raw_dtype=ty)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()

    # Tensor data, streamed: each tensor starts on the file's alignment and is padded
    # to it, as GGUFWriter.write_tensor_data does, but written in pieces of at most one
    # expert matrix so nothing file-sized is ever in memory.
    fout = w.fout[0]
    rng = np.random.default_rng(args.seed)
    total = sum(nbytes_of(sh, ggml_type_of(k, weights)) for _, sh, k in plan)
    done = 0
    for name, shape, kind in plan:
        ty = ggml_type_of(kind, weights)
        w.write_padding(fout, fout.tell())
        pieces = shape[0] if kind == "experts" else 1
        piece_shape = shape[1:] if kind == "experts" else shape
        nbytes = 0
        for _ in range(pieces):
            if kind == "ones":
                x = np.ones(piece_shape, dtype=np.float32)
            else:
                x = rng.standard_normal(piece_shape, dtype=np.float32)
                x *= INIT_STD
            y = encode(x, ty)
            y.tofile(fout)
            nbytes += y.nbytes
        if nbytes != nbytes_of(shape, ty):
            sys.exit(f"moe_gguf.py: {name}: wrote {nbytes} bytes, its header says {nbytes_of(shape, ty)}")
        w.write_padding(fout, nbytes)
        done += nbytes
        if kind == "experts":
            print(f"moe_gguf.py: {name} ({done / 2**30:.1f} of {total / 2**30:.1f} GiB)", file=sys.stderr)
    w.close()
    part.rename(out)
    print(json.dumps({"file": str(out), "bytes": out.stat().st_size, **count(out)}))


def count(path: Path) -> dict:
    """Total and per-decode-token weight bytes and parameters of a MoE GGUF."""
    r = gguf.GGUFReader(path)
    arch = r.fields["general.architecture"].contents()

    def num(key: str) -> int:
        f = r.fields.get(f"{arch}.{key}")
        if f is None:
            sys.exit(f"moe_gguf.py: {path} has no {arch}.{key}")
        return int(f.contents())

    experts, used = num("expert_count"), num("expert_used_count")
    if not 0 < used <= experts:
        sys.exit(f"moe_gguf.py: {path}: expert_used_count {used} is not in 1..expert_count ({experts})")
    tb = ab = tp = ap = 0
    for t in r.tensors:
        b, p = int(t.n_bytes), int(t.n_elements)
        tb, tp = tb + b, tp + p
        if "_exps." in t.name:
            ab += b * used // experts
            ap += p * used // experts
        elif t.name == "token_embd.weight":
            rows = int(t.shape[-1])  # GGUF dims: [hidden, vocab]
            ab += b // rows
            ap += p // rows
        else:
            ab, ap = ab + b, ap + p
    return {"arch": arch, "experts": experts, "experts_used": used,
            "total_bytes": tb, "active_bytes": ab, "total_params": tp, "active_params": ap}


def compare(a_path: Path, b_path: Path) -> int:
    """Number of tensors whose type or bytes differ between two GGUFs (each listed),
    or that one of them lacks: how the Q8_0 that `write` makes is checked against
    llama-quantize's Q8_0 of the F16 that `write` makes with the same seed."""
    a, b = gguf.GGUFReader(a_path), gguf.GGUFReader(b_path)
    bt = {t.name: t for t in b.tensors}
    differ = 0
    for t in a.tensors:
        u = bt.pop(t.name, None)
        same = (u is not None and t.tensor_type == u.tensor_type
                and np.array_equal(np.asarray(t.data).view(np.uint8), np.asarray(u.data).view(np.uint8)))
        if not same:
            differ += 1
            print(f"{t.name}: {t.tensor_type.name} vs {'missing' if u is None else u.tensor_type.name}"
                  f"{'' if u is None or t.tensor_type != u.tensor_type else ', other bytes'}")
    for name in bt:
        differ += 1
        print(f"{name}: only in {b_path}")
    print(f"{len(a.tensors) - differ + len(bt)} of {len(a.tensors)} tensors the same" if not differ else
          f"{differ} tensors differ")
    return differ


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pw = sub.add_parser("write", help="write a random-weight F16 or Q8_0 GGUF")
    pw.add_argument("--shape", choices=sorted(SHAPES), required=True)
    pw.add_argument("--layers", type=int, required=True)
    pw.add_argument("--tokenizer-from", required=True, help="a GGUF whose tokenizer.* keys are copied")
    pw.add_argument("--seed", type=int, default=23)
    pw.add_argument("--type", choices=["f16", "q8_0"], default="f16", help="how the matrices are stored")
    pw.add_argument("--out", required=True)
    pa = sub.add_parser("active", help="print total and active weight bytes of a MoE GGUF as JSON")
    pa.add_argument("file")
    pa.add_argument("--text", action="store_true", help="one line for people instead of JSON")
    pc = sub.add_parser("compare", help="exit 1 unless two GGUFs hold the same tensors, byte for byte")
    pc.add_argument("a")
    pc.add_argument("b")
    args = p.parse_args()
    if args.cmd == "compare":
        sys.exit(1 if compare(Path(args.a), Path(args.b)) else 0)
    if args.cmd == "write":
        write(args)
    elif args.text:
        c = count(Path(args.file))
        print(f"{c['total_params'] / 1e9:.2f} B parameters, {c['active_params'] / 1e9:.3f} B active per token "
              f"({c['experts_used']} of {c['experts']} experts), {c['active_bytes'] / 1e6:.0f} MB read per token")
    else:
        print(json.dumps(count(Path(args.file))))


if __name__ == "__main__":
    main()
