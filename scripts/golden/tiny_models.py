#!/usr/bin/env python3
"""Tiny random-weight checkpoints of several decoder architectures, with golden outputs.

For every architecture below this script builds a tiny model with Hugging Face
`transformers` from a config written here (2 layers, hidden 64, 4 heads, GQA
where the architecture has it, vocab 320, 256 positions, float32), fills every
parameter from a fixed-seed generator, saves it with `save_pretrained` into
testdata/tiny/<name>/ (config.json, generation_config.json, model.safetensors)
and adds:

  * tokenizer.json: the same tiny byte-level tokenizer everywhere (a `tokenizers`
    BPE model over the 256 GPT-2 byte characters, id = byte value, no merges,
    ByteLevel pre-tokenizer and decoder, special tokens at ids 256..259);
  * golden.json: for three fixed prompts given as token ids (lengths 1, 7, 40),
    with eager attention on CPU in float32:
      - the logits of the LAST prompt position (all 320 values),
      - the argmax (and the top-1 minus top-2 gap) of EVERY position,
      - 16 greedy new tokens (do_sample=False, EOS ignored so exactly 16 come
        out) and the top-2 gap of every step,
    plus the versions used and the sha256 of every file in the directory.

For `opt` the same weights are also written as a PyTorch pickle
(pytorch_model.bin, torch.save of the same state dict, same tensor names) into
testdata/tiny/opt-bin/; transformers 5 dropped `save_pretrained(...,
safe_serialization=False)`, so the file is written with torch.save directly,
exactly as transformers 4 did.

Weights: transformers' own init leaves every bias at 0 and every norm weight at
1, which would let a kernel that ignores a bias or a norm weight pass. So every
parameter is overwritten, in sorted name order, from torch.Generator seeded
with SEED: matrices (and embeddings) ~ N(0, 0.1^2), biases ~ N(0, 0.1^2), norm
weights ~ 1 + N(0, 0.2^2). The 0.1 scale (instead of 0.02) makes attention
scores, and so RoPE and masking, matter, and keeps the logits well separated.

Checks (the script fails if one does not hold): each saved directory loads back
with from_pretrained (and opt-bin from the .bin) and reproduces the logits
bit for bit; generate() yields exactly 16 tokens, each the argmax of its step;
a teacher-forced pass over prompt + generated tokens agrees with the KV-cached
greedy steps; the feature each model is meant to exercise is really on (e.g.
the llama3 RoPE scaling changes the logits, the Mistral sliding window changes
the logits of the long prompt, qwen2's lm_head is the embedding matrix).

Run (from the repository root; about 10 seconds on 2 cores):

    HF_HUB_OFFLINE=1 ${KILN_CACHE:-$HOME/.cache/kiln}/venv-golden/bin/python \\
        scripts/golden/tiny_models.py [--out testdata/tiny]

The output is deterministic: a rerun with the same package versions rewrites
byte-identical files (README.md's date is the --date argument).
"""

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_golden as tg  # noqa: E402
from tiny_golden import sha256_of  # noqa: E402,F401  (tiny_gpt_oss.py and others call tm.sha256_of)

SEED = 20261125
VOCAB_SIZE = 320
MAX_POS = 256
NEW_TOKENS = 16
WEIGHT_STD = 0.1
BIAS_STD = 0.1
NORM_STD = 0.2

# Special tokens of the tiny tokenizer (ids after the 256 byte tokens).
SPECIALS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
EOS_ID = 256  # also BOS
PAD_ID = 257

# Prompts as token ids; with the tiny tokenizer an id is a byte, so these are ASCII text.
PROMPTS = [
    list(b"K"),
    list(b"The cat"),
    list(b"Kiln fires clay; tiny models test the ki"),
]
assert [len(p) for p in PROMPTS] == [1, 7, 40]


def bytes_to_unicode():
    """GPT-2's byte -> printable character map (the ByteLevel alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def tokenizer_json() -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == 256 + i, (s, tok.token_to_id(s))
    # Self-check: ids are bytes, and decoding round-trips.
    for p in PROMPTS:
        text = bytes(p).decode("ascii")
        assert tok.encode(text).ids == p, (text, tok.encode(text).ids)
        assert tok.decode(p) == text
    return tok.to_str(pretty=True) + "\n"


# ---------------------------------------------------------------------------------------------
# Architectures. Each entry: name, builder() -> (config, model class), what it exercises.

COMMON = dict(vocab_size=VOCAB_SIZE, bos_token_id=EOS_ID, eos_token_id=EOS_ID)


def llama_cfg(**over):
    from transformers import LlamaConfig

    kw = dict(
        COMMON,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POS,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    kw.update(over)
    return LlamaConfig(**kw)


def build_configs():
    from transformers import (
        GPT2Config,
        MistralConfig,
        OPTConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    llama3_rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    return [
        (
            "llama",
            llama_cfg(),
            "LlamaForCausalLM: RMSNorm, SwiGLU MLP, RoPE (theta 10000, rotate-half), GQA (4 query heads, "
            "2 KV heads, head_dim 16), separate lm_head (tie_word_embeddings=false).",
        ),
        (
            "llama31",
            llama_cfg(rope_parameters=llama3_rope),
            "Llama with Llama-3.1 RoPE scaling (rope_type llama3, factor 8, low_freq_factor 1, "
            "high_freq_factor 4, original_max_position_embeddings 16). The scaling rewrites the RoPE "
            "frequencies, whatever the position: with head_dim 16 and theta 1e4 the 8 wavelengths are "
            "6.3..19869 positions; 6.3 lies in the smoothed band (4..16 = original/high_freq_factor.."
            "original/low_freq_factor), the 7 others are > 16 and their frequency is divided by 8. Only "
            "position 0 (rotation by 0) is unaffected, so every prompt longer than 1 token differs from "
            "the unscaled model (checked). GQA and untied lm_head as in llama.",
        ),
        (
            "mistral",
            MistralConfig(
                **COMMON,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                max_position_embeddings=MAX_POS,
                rms_norm_eps=1e-5,
                sliding_window=24,
                tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            ),
            "MistralForCausalLM: Llama layout plus sliding_window=24 in every layer. transformers' mask: "
            "the query at position q sees keys k with q-24 < k <= q (24 keys including itself). The 40-token "
            "prompt (positions 0..39, generation queries up to 54) is affected; the 1- and 7-token prompts "
            "are not (their queries reach positions 15 and 21 only). GQA 4/2.",
        ),
        (
            "qwen2",
            Qwen2Config(
                **COMMON,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=MAX_POS,
                rms_norm_eps=1e-6,
                tie_word_embeddings=True,
                use_sliding_window=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            ),
            "Qwen2ForCausalLM: bias on q/k/v projections (none on o_proj), GQA 4/2, tied embeddings "
            "(no lm_head.weight in the file: the output layer is model.embed_tokens.weight), "
            "rope_theta 1e6.",
        ),
        (
            "qwen3",
            Qwen3Config(
                **COMMON,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=32,
                max_position_embeddings=MAX_POS,
                rms_norm_eps=1e-6,
                tie_word_embeddings=False,
                attention_bias=False,
                use_sliding_window=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            ),
            "Qwen3ForCausalLM: per-head RMSNorm on q and k (q_norm/k_norm, weight of size head_dim, applied "
            "before RoPE), head_dim 32 != hidden/heads (q_proj 64->128, k/v_proj 64->64, o_proj 128->64), "
            "GQA 4/2, no qkv bias, untied lm_head, rope_theta 1e6.",
        ),
        (
            "gpt2",
            GPT2Config(
                **COMMON,
                n_embd=64,
                n_head=4,
                n_layer=2,
                n_positions=MAX_POS,
                n_inner=None,
                activation_function="gelu_new",
                layer_norm_epsilon=1e-5,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
                tie_word_embeddings=True,
            ),
            "GPT2LMHeadModel: learned absolute positions (wpe, 256), pre-LayerNorm with biases, fused "
            "c_attn ([q | k | v] columns), Conv1D weights stored as [in, out] (transposed relative to "
            "nn.Linear), gelu_new (tanh approximation) MLP of n_inner=null -> 4*64=256, attention scaled "
            "by 1/sqrt(16), ln_f, tied lm_head = wte. Tensor names carry the 'transformer.' prefix "
            "(Hub GPT-2 checkpoints have none, and also hold attn.bias mask buffers).",
        ),
        (
            "phi3",
            Phi3Config(
                **COMMON,
                pad_token_id=PAD_ID,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=MAX_POS,
                original_max_position_embeddings=MAX_POS,
                rms_norm_eps=1e-5,
                tie_word_embeddings=False,
                sliding_window=None,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
            ),
            "Phi3ForCausalLM: fused qkv_proj ([q | k | v] rows: 64 + 32 + 32) and fused gate_up_proj "
            "([gate | up] rows: 128 + 128, SwiGLU), GQA 4/2 via num_key_value_heads, no rope scaling, "
            "no sliding window, untied lm_head, pad_token_id 257 (< vocab).",
        ),
        (
            "opt",
            OPTConfig(
                **COMMON,
                pad_token_id=PAD_ID,
                hidden_size=64,
                ffn_dim=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=MAX_POS,
                word_embed_proj_dim=32,
                do_layer_norm_before=True,
                activation_function="relu",
                enable_bias=True,
                layer_norm_elementwise_affine=True,
                dropout=0.0,
                attention_dropout=0.0,
                tie_word_embeddings=True,
            ),
            "OPTForCausalLM, pre-LN (do_layer_norm_before=true, final_layer_norm present): embeddings of "
            "width word_embed_proj_dim 32 -> project_in (32->64, no bias) -> + learned positions "
            "(embed_positions has 256+2 rows; position p uses row p+2) -> layers -> final_layer_norm -> "
            "project_out (64->32, no bias) -> lm_head tied to embed_tokens (320x32). ReLU MLP (fc1/fc2), "
            "biases on every linear of the layers, q scaled by 1/sqrt(head_dim).",
        ),
        (
            "opt-postln",
            OPTConfig(
                **COMMON,
                pad_token_id=PAD_ID,
                hidden_size=64,
                ffn_dim=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=MAX_POS,
                word_embed_proj_dim=64,
                do_layer_norm_before=False,
                activation_function="relu",
                enable_bias=True,
                layer_norm_elementwise_affine=True,
                dropout=0.0,
                attention_dropout=0.0,
                tie_word_embeddings=True,
            ),
            "OPTForCausalLM, post-LN like OPT-350m (do_layer_norm_before=false): LayerNorm AFTER each "
            "residual add (self_attn_layer_norm after attention, final_layer_norm of the layer after the "
            "MLP), and no decoder-level final_layer_norm; word_embed_proj_dim == hidden (no "
            "project_in/project_out); learned positions with offset 2, ReLU, biases, tied lm_head.",
        ),
    ]


# ---------------------------------------------------------------------------------------------


def f32(x) -> float:
    """A float32 value as the Python float (double) that holds it exactly; json writes its repr."""
    import numpy as np

    return float(np.float32(x))


def randomize(model, seed: int):
    """Overwrite every parameter from a seeded generator, in sorted name order."""
    import torch

    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())  # tied parameters appear once
    with torch.no_grad():
        for name in sorted(params):
            p = params[name]
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * WEIGHT_STD)
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * BIAS_STD)
            else:  # norm weights (RMSNorm / LayerNorm gains)
                p.copy_(1.0 + torch.randn(p.shape, generator=g, dtype=torch.float32) * NORM_STD)


def top2_gap(logits):
    t = logits.topk(2, dim=-1).values
    return t[..., 0] - t[..., 1]


def greedy_config(model):
    from transformers import GenerationConfig

    # generate() copies eos_token_id from the model's generation_config when the passed one is
    # None; clear it there too so EOS (256) is just another token and exactly 16 come out.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD_ID
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=None,
        repetition_penalty=1.0,
        temperature=None,
        top_k=None,
        top_p=None,
        eos_token_id=None,
        pad_token_id=PAD_ID,
        use_cache=True,
        output_logits=True,
        return_dict_in_generate=True,
    )


def run_prompts(model, failures, tag):
    """Forward passes and greedy generation for every prompt; returns the golden records."""
    import torch

    gen_cfg = greedy_config(model)
    recs = []
    for i, ids in enumerate(PROMPTS):
        x = torch.tensor([ids], dtype=torch.long)
        mask = torch.ones_like(x)
        logits = model(input_ids=x, attention_mask=mask, use_cache=False).logits[0]
        assert logits.dtype == torch.float32 and logits.shape == (len(ids), VOCAB_SIZE)
        gen = model.generate(input_ids=x, attention_mask=mask, generation_config=gen_cfg)
        seq = gen.sequences[0].tolist()
        greedy = seq[len(ids):]
        steps = torch.stack([s[0] for s in gen.logits])
        if seq[: len(ids)] != ids:
            failures.append(f"{tag} p{i}: generate() changed the prompt")
        if len(greedy) != NEW_TOKENS or steps.shape[0] != NEW_TOKENS:
            failures.append(f"{tag} p{i}: generated {len(greedy)} tokens")
        if steps.argmax(-1).tolist() != greedy:
            failures.append(f"{tag} p{i}: generated ids are not the argmax of their step logits")
        d0 = float((steps[0] - logits[-1]).abs().max())
        if d0 > 1e-5:
            failures.append(f"{tag} p{i}: generate() step 0 differs from the forward pass by {d0}")
        # Teacher-forced pass (no cache) over prompt + generated tokens.
        full = torch.tensor([ids + greedy[:-1]], dtype=torch.long)
        tf = model(input_ids=full, attention_mask=torch.ones_like(full), use_cache=False).logits[0][len(ids) - 1:]
        tf_diff = float((tf - steps).abs().max())
        gaps = top2_gap(steps)
        for s, (a, b) in enumerate(zip(tf.argmax(-1).tolist(), greedy)):
            if a != b and float(gaps[s]) > 1e-4:
                failures.append(f"{tag} p{i} step {s}: teacher-forced argmax {a} != greedy {b}")
        if tf_diff > 1e-4:
            failures.append(f"{tag} p{i}: KV-cached vs full-pass logits differ by {tf_diff}")
        recs.append(
            {
                "ids": ids,
                "last_logits": [f32(v) for v in logits[-1].tolist()],
                "argmax": logits.argmax(-1).tolist(),
                "argmax_top2_gap": [f32(v) for v in top2_gap(logits).tolist()],
                "greedy": greedy,
                "greedy_top2_gap": [f32(v) for v in gaps.tolist()],
                "_logits": logits,  # dropped before writing
                "_kv_vs_full_max_abs_diff": tf_diff,
            }
        )
    return recs


def load_back(path, reference, failures):
    """from_pretrained(path): checks every tensor equals the reference model's, then moves the
    parameters into freshly allocated memory. (Tensors loaded from a file sit at other alignments,
    and the CPU BLAS then sums a 1-row product in another order: differences of ~1e-6 for the
    1-token prompt. Same memory layout -> same bits.)"""
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    m.eval()
    a, b = reference.state_dict(), m.state_dict()
    if sorted(a) != sorted(b):
        failures.append(f"{path}: reloaded tensor names differ: {sorted(set(a) ^ set(b))}")
    for k in a:
        if k in b and not torch.equal(a[k], b[k]):
            failures.append(f"{path}: reloaded tensor {k} differs")
    for p in m.parameters():
        p.data = p.data.clone()
    return m


def check_reload(d, model, recs, failures, name):
    """The checkpoint in `d` loads back to the same tensors and the same logits, bit for bit."""
    import torch

    for i, lg in enumerate(forward_all(load_back(d, model, failures))):
        if not torch.equal(lg, recs[i]["_logits"]):
            failures.append(f"{name}: reloaded model's logits differ for p{i}: {float((lg - recs[i]['_logits']).abs().max())}")


def forward_all(model):
    import torch

    out = []
    for ids in PROMPTS:
        x = torch.tensor([ids], dtype=torch.long)
        out.append(model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits[0])
    return out


def feature_checks(name, cfg, model, recs, failures, notes):
    """Make sure the feature a model is meant to exercise changes the outputs."""
    import torch
    from transformers import AutoModelForCausalLM

    def variant(**changes):
        c = copy.deepcopy(cfg)
        for k, v in changes.items():
            setattr(c, k, v)
        m = AutoModelForCausalLM.from_config(c, attn_implementation="eager", dtype=torch.float32)
        sd = model.state_dict()
        missing, unexpected = m.load_state_dict(sd, strict=False)
        m.eval()
        return forward_all(m)

    def differs(other, idx):
        return float((other[idx] - recs[idx]["_logits"]).abs().max())

    if name == "llama31":
        other = variant(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        d = [differs(other, i) for i in range(3)]
        notes.append(f"llama31: max |logit change| without the llama3 RoPE scaling: {['%.3g' % v for v in d]}")
        if d[2] < 1e-2:
            failures.append("llama31: rope scaling does not change the 40-token prompt's logits")
    if name == "mistral":
        other = variant(sliding_window=None)
        d = [differs(other, i) for i in range(3)]
        notes.append(f"mistral: max |logit change| without the sliding window: {['%.3g' % v for v in d]}")
        if d[2] < 1e-2 or d[0] != 0.0 or d[1] != 0.0:
            failures.append(f"mistral: sliding window effect unexpected: {d}")
    if name in ("qwen2", "gpt2", "opt", "opt-postln"):
        emb = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        if head.data_ptr() != emb.data_ptr():
            failures.append(f"{name}: lm_head is not tied to the embeddings")
    if name in ("llama", "llama31", "mistral", "qwen3", "phi3"):
        if model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr():
            failures.append(f"{name}: lm_head is tied but should not be")
    if name == "opt":
        dec = model.model.decoder
        if dec.project_in is None or dec.project_out is None or dec.final_layer_norm is None:
            failures.append("opt: project_in/project_out/final_layer_norm missing")
    if name == "opt-postln":
        dec = model.model.decoder
        if dec.project_in is not None or dec.project_out is not None or dec.final_layer_norm is not None:
            failures.append("opt-postln: unexpected project_in/project_out/final_layer_norm")


def legacy_config_fields(cfg):
    """The pre-transformers-5 spelling of the RoPE fields (what Hub checkpoints carry)."""
    rp = getattr(cfg, "rope_parameters", None)
    if not rp:
        return None
    rp = dict(rp)
    theta = rp.pop("rope_theta", None)
    out = {"rope_theta": theta}
    prf = rp.pop("partial_rotary_factor", None)
    if prf is not None and prf != 1.0:
        out["partial_rotary_factor"] = prf
    if rp.get("rope_type", "default") == "default":
        out["rope_scaling"] = None
    else:
        out["rope_scaling"] = rp
    return out


def main() -> int:
    repo_root = Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(repo_root / "testdata" / "tiny"), help="output folder")
    ap.add_argument("--date", default="2026-11-25", help="date written in README.md")
    args = ap.parse_args()
    out = Path(args.out)

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    versions = tg.setup_torch()
    tok_json = tokenizer_json()

    failures, notes, summary = [], [], []
    out.mkdir(parents=True, exist_ok=True)
    for idx, (name, cfg, exercises) in enumerate(build_configs()):
        tag = name
        torch.manual_seed(SEED + idx)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
        model.eval()
        randomize(model, SEED + idx)
        if any(p.dtype != torch.float32 for p in model.parameters()):
            failures.append(f"{name}: non-float32 parameters")

        d = out / name
        tg.save_checkpoint(model, d, tok_json)

        recs = run_prompts(model, failures, tag)
        feature_checks(name, model.config, model, recs, failures, notes)

        # Load back from disk and compare bit for bit.
        check_reload(d, model, recs, failures, name)

        extra_dirs = []
        if name == "opt":
            bd = out / "opt-bin"
            if bd.exists():
                shutil.rmtree(bd)
            bd.mkdir(parents=True)
            for f in ("config.json", "generation_config.json", "tokenizer.json"):
                shutil.copyfile(d / f, bd / f)
            # The same tensors under the same names as model.safetensors, each its own storage.
            sd = load_file(str(d / "model.safetensors"))
            sd = {k: sd[k].clone().contiguous() for k in sorted(sd)}
            torch.save(sd, bd / "pytorch_model.bin")
            rb = load_back(bd, model, failures)
            for i, lg in enumerate(forward_all(rb)):
                if not torch.equal(lg, recs[i]["_logits"]):
                    failures.append(f"opt-bin: logits differ for p{i}")
            extra_dirs.append(bd)

        st = load_file(str(d / "model.safetensors"))
        init = {"matrix_std": WEIGHT_STD, "bias_std": BIAS_STD, "norm_weight": f"1 + N(0, {NORM_STD}^2)"}
        common = tg.common_fields(model, st, recs, versions, SEED + idx, init)
        n_params = common["n_params"]
        for dd in [d] + extra_dirs:
            tg.write_golden(
                dd,
                dict(
                    common,
                    name=dd.name,
                    exercises=exercises
                    + (" Same weights as ../opt, stored as a PyTorch pickle (pytorch_model.bin)." if dd.name == "opt-bin" else ""),
                    legacy_config_fields=legacy_config_fields(model.config),
                    vocab_size=VOCAB_SIZE,
                    new_tokens=NEW_TOKENS,
                ),
            )
        size = sum(f.stat().st_size for f in d.iterdir())
        min_gap, kv = tg.record_stats(recs)
        summary.append((name, n_params, size, min_gap, kv, [r["greedy"] for r in recs]))
        print(
            f"tiny: {name:11s} {n_params:7d} params, {size / 1024:6.1f} KiB, min top-2 gap {min_gap:.4f}, "
            f"KV vs full max diff {kv:.1e}",
            flush=True,
        )
        for dd in [d] + extra_dirs:
            tot = sum(f.stat().st_size for f in dd.iterdir())
            if tot >= 1 << 20:
                failures.append(f"{dd.name}: {tot} bytes, over 1 MiB")

    write_readme(out, args.date, versions, summary)
    for n in notes:
        print("tiny: note:", n)
    for f in failures:
        print("tiny: FAIL:", f, file=sys.stderr)
    return 1 if failures else 0


def write_readme(out: Path, date: str, versions, summary):
    lines = []
    lines.append("# Tiny random-weight checkpoints\n")
    lines.append(
        "Generated by `scripts/golden/tiny_models.py` on "
        + date
        + " with transformers "
        + versions["transformers"]
        + ", torch "
        + versions["torch"]
        + ", tokenizers "
        + versions["tokenizers"]
        + ", safetensors "
        + versions["safetensors"]
        + " (Python "
        + versions["python"]
        + ", CPU, float32, eager attention, 1 thread).\n"
    )
    lines.append("Regenerate (from the repository root; about 10 seconds on 2 cores; byte-identical on rerun):\n")
    lines.append("```sh")
    lines.append("HF_HUB_OFFLINE=1 ${KILN_CACHE:-$HOME/.cache/kiln}/venv-golden/bin/python scripts/golden/tiny_models.py")
    lines.append("```\n")
    lines.append(
        "Every directory holds `config.json`, `generation_config.json` and `model.safetensors` as "
        "`save_pretrained` wrote them, `tokenizer.json`, and `golden.json`. Common to all: 2 layers, "
        "hidden 64, 4 attention heads, vocab 320, 256 positions, bos = eos = 256. Weights are random "
        "(seeded; matrices N(0, 0.1^2), biases N(0, 0.1^2), norm weights 1 + N(0, 0.2^2)) so that "
        "biases and norm weights are not the trivial 0 and 1.\n"
    )
    lines.append("## Tokenizer\n")
    lines.append(
        "The same `tokenizer.json` everywhere: a `tokenizers` BPE model whose 256 tokens are the GPT-2 "
        "byte characters with id = byte value, no merges, a ByteLevel pre-tokenizer (GPT-2 regex, no "
        "prefix space) and ByteLevel decoder, no post-processor, and the special tokens "
        "`<|endoftext|>` 256, `<|pad|>` 257, `<|im_start|>` 258, `<|im_end|>` 259. Model ids 260..319 "
        "have no token. Any ASCII text therefore encodes to its bytes.\n"
    )
    lines.append("## golden.json\n")
    lines.append(
        "For the prompts `K`, `The cat` and `Kiln fires clay; tiny models test the ki` (token ids = "
        "bytes; lengths 1, 7, 40): `last_logits` (the 320 logits of the last position, float32 values "
        "written exactly), `argmax` of every position and its `argmax_top2_gap` (top-1 minus top-2 "
        "logit), `greedy`: 16 greedy new tokens (KV cache, EOS ignored) and `greedy_top2_gap` per step. "
        "Also: versions, seed, tensor names and shapes, `files_sha256` of the other files, and "
        "`legacy_config_fields`, i.e. how the RoPE fields read in a pre-transformers-5 `config.json` "
        "(`rope_theta` + `rope_scaling`; transformers 5 writes `rope_parameters` instead, see below).\n"
    )
    lines.append("## Models\n")
    lines.append("| directory | params | size | min top-2 gap | exercises |")
    lines.append("|---|---|---|---|---|")
    docs = {}
    for name, n, size, gap, kv, _ in summary:
        doc = json.loads((out / name / "golden.json").read_text())
        docs[name] = doc
        lines.append(f"| `{name}/` | {n} | {size / 1024:.0f} KiB | {gap:.3g} | {doc['exercises']} |")
        if name == "opt":
            bsize = sum(f.stat().st_size for f in (out / "opt-bin").iterdir())
            lines.append(
                f"| `opt-bin/` | {n} | {bsize / 1024:.0f} KiB | {gap:.3g} | The weights of `opt/` as "
                "`pytorch_model.bin` (torch.save zip/pickle of the same state dict, same tensor names), "
                "with the same config, tokenizer and golden outputs. |"
            )
    lines.append("")
    lines.append("## transformers 5 notes\n")
    lines.append(
        "* `config.json` carries RoPE settings as `rope_parameters` (e.g. `{\"rope_type\": \"llama3\", "
        "\"rope_theta\": 10000.0, \"factor\": 8.0, ...}`; Phi-3 adds `partial_rotary_factor`) instead of "
        "the top-level `rope_theta` and `rope_scaling` that checkpoints on the Hub use. transformers 5 "
        "still reads the old spelling. A loader should accept both.\n"
        "* `save_pretrained` no longer has `safe_serialization=False`; `opt-bin/pytorch_model.bin` is "
        "written with `torch.save` of the state dict (what transformers 4 did), and transformers 5 "
        "still loads it.\n"
        "* Tied models (qwen2, gpt2, opt, opt-postln) have no `lm_head.weight` tensor in the file.\n"
        "* `config.json` also holds `dtype` (was `torch_dtype`).\n"
    )
    lines.append("## Using the golden values\n")
    lines.append(
        "* Compare logits with a tolerance (1e-4 absolute is ample), not bit for bit: even transformers "
        "itself gives ~1e-6 different logits for the 1-token prompt when the same weights sit at another "
        "memory alignment (the CPU BLAS then sums the 1-row product in another order). The script "
        "checks the reload bit for bit only after copying the weights into fresh memory.\n"
        "* `argmax_top2_gap` / `greedy_top2_gap` tell how safe each argmax is; the smallest is in the "
        "table above (opt: 8.6e-4), far above float32 noise.\n"
        "* Greedy outputs may contain the special ids 256..259 and ids 260..319 that have no token in "
        "`tokenizer.json`: compare ids, not decoded text. Random models also fall into repetition "
        "(e.g. qwen2, opt-postln): the KV-cached steps are still checked against a teacher-forced "
        "full pass.\n"
    )
    (out / "README.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
