#!/usr/bin/env python3
"""Tiny random-weight Gemma 2 and Gemma 3 (text) checkpoints, with golden outputs.

The companion of tiny_models.py (same tokenizer, prompts, seeds scheme, golden.json
format and self-checks; its helpers are imported from it), for the two Gemma
families, written to testdata/tiny/gemma2/ and testdata/tiny/gemma3/:

  * gemma2: Gemma2ForCausalLM, 4 layers (local, global, local, global), hidden 64,
    4 heads / 2 KV heads of 16, sliding_window 8, attention soft cap 1.0 and final
    logit soft cap 2.0 (small enough to bend these random models' scores and
    logits; the real models' 50 and 30 would not), query_pre_attn_scalar 16 (=
    head_dim, as in Gemma 2 2B/9B: llama.cpp derives the attention scale from the
    model size, so a GGUF form of any other value could not be right), tied
    embeddings.
  * gemma3: Gemma3ForCausalLM, 6 layers (five local, then one global: the default
    pattern of 6 that llama.cpp also assumes), hidden 64, 4 heads / 2 KV heads of
    32 (head_dim != hidden / heads), intermediate 64 (under 1 MiB), q/k RMSNorm,
    sliding_window 8; global layers
    rotate with theta 1e6 and linear scaling 8, local ones with theta 1e4 unscaled;
    query_pre_attn_scalar 32 (= head_dim), no soft caps, tied embeddings.

Weights as in tiny_models.py (every parameter from a seeded generator, sorted by
name, matrices N(0, 0.1^2)), except that norm weights are N(0, 0.2^2): Gemma's
RMSNorm multiplies by (1 + w), so the gains are 1 + N(0, 0.2^2) as elsewhere.

golden.json also holds `variants`: the outputs of the same weights with another
query_pre_attn_scalar (gemma2 24, gemma3 16), for the 40-token prompt, so that the attention scale is tested
apart from head_dim (a GGUF cannot carry it: llama.cpp derives it from the model size).

Checks on top of tiny_models.py's (the script fails if one does not hold): each
feature changes the logits when switched off: the soft caps (gemma2), the sliding
window (the 40-token prompt only; the 1- and 7-token prompts stay inside the window
and are unchanged), the alternation (all layers local differs from the mix), the
local layers' own RoPE base (gemma3), the global layers' RoPE scaling (gemma3),
the embedding scale and the (1 + w) norms (a model with norm weights one higher
computes something else).

Run (from the repository root; about 20 seconds on 2 cores):

    HF_HUB_OFFLINE=1 ${KILN_CACHE:-$HOME/.cache/kiln}/venv-golden/bin/python \\
        scripts/golden/tiny_gemma.py [--out testdata/tiny]

Deterministic: a rerun with the same package versions rewrites byte-identical files.
"""

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_models as tm  # noqa: E402  (sets the offline environment variables too)
import tiny_golden as tg  # noqa: E402

# Seeds after tiny_models.py's (SEED + 0..8).
SEED = tm.SEED + 100
WINDOW = 8


def build_configs():
    from transformers import Gemma2Config, Gemma3TextConfig

    common = dict(
        tm.COMMON,
        pad_token_id=tm.PAD_ID,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=tm.MAX_POS,
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        sliding_window=WINDOW,
        tie_word_embeddings=True,
        attention_bias=False,
    )
    return [
        (
            "gemma2",
            Gemma2Config(
                **common,
                num_hidden_layers=4,
                head_dim=16,
                intermediate_size=128,
                query_pre_attn_scalar=16,
                attn_logit_softcapping=1.0,
                final_logit_softcapping=2.0,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            ),
            "Gemma2ForCausalLM: embeddings times sqrt(64) = 8, RMSNorm as x * (1 + w), four norms per "
            "layer (input, post-attention on the attention output before the residual add, "
            "pre-feedforward, post-feedforward), GELU-tanh gated MLP, attention scale "
            "query_pre_attn_scalar^-0.5 = 1/4, attention scores soft-capped at 1.0 (cap * tanh(s / cap) "
            "before the mask), final logits soft-capped at 2.0, layers 0 and 2 local (sliding_window 8: "
            "a query at q sees keys q-8 < k <= q) and 1 and 3 global, GQA 4/2, head_dim 16, tied "
            "embeddings, rope_theta 1e4.",
        ),
        (
            "gemma3",
            Gemma3TextConfig(
                **common,
                num_hidden_layers=6,
                head_dim=32,
                intermediate_size=64,
                query_pre_attn_scalar=32,
                rope_parameters={
                    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                },
            ),
            "Gemma3ForCausalLM (gemma3_text): as gemma2 but no soft caps, per-head RMSNorm (1 + w) on q "
            "and k before RoPE, head_dim 32 != hidden / heads (q_proj 64->128), layers 0-4 local "
            "(sliding_window 8, RoPE theta 1e4, unscaled) and layer 5 global (RoPE theta 1e6 with linear "
            "scaling, factor 8), attention scale 32^-0.5, GQA 4/2, tied embeddings.",
        ),
    ]


def randomize(model, seed):
    """tiny_models.py's fill, then norm weights shifted to N(0, 0.2^2): Gemma's gain is 1 + w."""
    import torch

    tm.randomize(model, seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("norm.weight"):
                p.sub_(1.0)


def feature_checks(name, cfg, model, recs, failures, notes):
    """Each Gemma feature, switched off, must change the logits."""
    import torch
    from transformers import AutoModelForCausalLM

    def variant(shift_norms=0.0, **changes):
        c = copy.deepcopy(cfg)
        for k, v in changes.items():
            setattr(c, k, v)
        m = AutoModelForCausalLM.from_config(c, attn_implementation="eager", dtype=torch.float32)
        m.load_state_dict(model.state_dict(), strict=True)
        if shift_norms:
            with torch.no_grad():
                for n, p in m.named_parameters():
                    if p.ndim == 1 and n.endswith("norm.weight"):
                        p.add_(shift_norms)
        m.eval()
        return tm.forward_all(m)

    def check(what, other, want_same=()):
        d = [float((other[i] - recs[i]["_logits"]).abs().max()) for i in range(3)]
        notes.append(f"{name}: max |logit change| {what}: {['%.3g' % v for v in d]}")
        if d[2] < 1e-2:
            failures.append(f"{name}: {what} does not change the 40-token prompt's logits: {d}")
        for i in want_same:
            if d[i] != 0.0:
                failures.append(f"{name}: {what} changes prompt {i}, which it should not: {d}")

    n = cfg.num_hidden_layers
    local = ["sliding_attention" if t == "sliding_attention" else "full_attention" for t in cfg.layer_types]
    if "full_attention" not in local or "sliding_attention" not in local:
        failures.append(f"{name}: layer types {local} do not mix local and global layers")
    check("without the sliding window", variant(sliding_window=10_000), want_same=(0, 1))
    check("with every layer local", variant(layer_types=["sliding_attention"] * n))
    check("with norm weights one higher", variant(shift_norms=1.0))
    if name == "gemma2":
        check("without the attention soft cap", variant(attn_logit_softcapping=None))
        check("without the final soft cap", variant(final_logit_softcapping=None))
        if any(r["_logits"].abs().max() >= 2.0 for r in recs):
            failures.append("gemma2: a logit beyond the final soft cap")
    if name == "gemma3":
        rp = copy.deepcopy(cfg.rope_parameters)
        rp["sliding_attention"]["rope_theta"] = rp["full_attention"]["rope_theta"]
        check("with the local layers on the global RoPE base", variant(rope_parameters=rp))
        rp = copy.deepcopy(cfg.rope_parameters)
        rp["full_attention"] = {"rope_type": "default", "rope_theta": rp["full_attention"]["rope_theta"]}
        check("without the global RoPE scaling", variant(rope_parameters=rp))
    emb = model.get_input_embeddings()
    if float(emb.embed_scale) != 8.0:
        failures.append(f"{name}: embedding scale {float(emb.embed_scale)}, not sqrt(64)")
    if model.get_output_embeddings().weight.data_ptr() != emb.weight.data_ptr():
        failures.append(f"{name}: lm_head is not tied to the embeddings")


def main() -> int:
    repo_root = Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(repo_root / "testdata" / "tiny"), help="output folder")
    args = ap.parse_args()
    out = Path(args.out)

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    versions = tg.setup_torch()
    tok_json = tm.tokenizer_json()
    failures, notes = [], []
    for idx, (name, cfg, exercises) in enumerate(build_configs()):
        seed = SEED + idx
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
        model.eval()
        randomize(model, seed)
        d = out / name
        tg.save_checkpoint(model, d, tok_json)

        recs = tm.run_prompts(model, failures, name)
        feature_checks(name, model.config, model, recs, failures, notes)
        # The attention scale is query_pre_attn_scalar^-0.5, not head_dim^-0.5: the same weights
        # under another scalar (a config a GGUF cannot express, so only the safetensors form).
        scalar = {"gemma2": 24, "gemma3": 16}[name]
        vcfg = copy.deepcopy(model.config)
        vcfg.query_pre_attn_scalar = scalar
        vmodel = AutoModelForCausalLM.from_config(vcfg, attn_implementation="eager", dtype=torch.float32)
        vmodel.load_state_dict(model.state_dict(), strict=True)
        vmodel.eval()
        vrecs = tm.run_prompts(vmodel, failures, f"{name} (query_pre_attn_scalar {scalar})")
        vd = float((vrecs[2]["_logits"] - recs[2]["_logits"]).abs().max())
        notes.append(f"{name}: max |logit change| with query_pre_attn_scalar {scalar}: {vd:.3g}")
        if vd < 1e-2:
            failures.append(f"{name}: query_pre_attn_scalar {scalar} does not change the logits")
        tm.check_reload(d, model, recs, failures, name)

        st = load_file(str(d / "model.safetensors"))
        init = {"matrix_std": tm.WEIGHT_STD, "bias_std": tm.BIAS_STD, "norm_weight": f"N(0, {tm.NORM_STD}^2), used as 1 + w"}
        common = tg.common_fields(model, st, recs, versions, seed, init)
        n_params = common["n_params"]
        tg.write_golden(
            d,
            dict(
                common,
                name=name,
                exercises=exercises,
                generator="scripts/golden/tiny_gemma.py",
                layer_types=list(model.config.layer_types),
                vocab_size=tm.VOCAB_SIZE,
                new_tokens=tm.NEW_TOKENS,
                variants=[
                    {
                        "config_changes": {"query_pre_attn_scalar": scalar},
                        "why": "the same weights with an attention scale other than head_dim^-0.5",
                        # The 40-token prompt only (the directory stays under 1 MiB).
                        "prompts": [{k: v for k, v in vrecs[2].items() if not k.startswith("_")}],
                    }
                ],
            ),
        )
        size = sum(f.stat().st_size for f in d.iterdir())
        min_gap, kv = tg.record_stats(recs)
        print(
            f"tiny: {name:7s} {n_params:7d} params, {size / 1024:6.1f} KiB, min top-2 gap {min_gap:.4f}, "
            f"KV vs full max diff {kv:.1e}, greedy {[r['greedy'] for r in recs]}",
            flush=True,
        )
        if size >= 1 << 20:
            failures.append(f"{name}: {size} bytes, over 1 MiB")
    for n in notes:
        print("tiny: note:", n)
    for f in failures:
        print("tiny: FAIL:", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
