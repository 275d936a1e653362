#!/usr/bin/env python3
"""A tiny random-weight gpt-oss checkpoint with golden outputs, for the family's wiring.

The companion of tiny_models.py (its tokenizer, weight init, prompts, greedy
runs and self-checks are imported from it) for transformers' GptOssForCausalLM,
written to testdata/tiny/gpt_oss/ (config.json, generation_config.json,
model.safetensors with the experts unquantized, tokenizer.json, golden.json):
2 layers (the first sliding, window 8, the second full), hidden 64, 4 heads /
2 KV heads of 16 with q/k/v/o biases, attention sinks, 4 experts top-2 with
router and expert biases, the clamped SwiGLU, YaRN (factor 4 over 64
original positions, beta 32/1, truncate false), float32, eager attention.

Init: as tiny_models.py (every parameter from a seeded generator), then the
sinks ~ N(0, 1) (tiny_models' 1 + N(0, 0.2^2) would make them all alike) and
`swiglu_limit` 0.5 rather than 7 so that the clamp binds at these activation
sizes. The script fails unless each gpt-oss piece really changes the logits:
the sinks (set to -1e4), the clamp (limit 1e4), the sliding window (1e4) and
YaRN (default RoPE).

    HF_HUB_OFFLINE=1 ${KILN_CACHE:-$HOME/.cache/kiln}/venv-golden/bin/python \\
        scripts/golden/tiny_gpt_oss.py [--out testdata/tiny]

Deterministic: a rerun with the same versions rewrites byte-identical files.
"""

import argparse
import copy
import json
import platform
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_models as tm  # noqa: E402

SEED = tm.SEED + 100


def config():
    from transformers import GptOssConfig

    return GptOssConfig(
        vocab_size=tm.VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
        max_position_embeddings=tm.MAX_POS,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
        },
        swiglu_limit=0.5,
        attention_bias=True,
        tie_word_embeddings=False,
        bos_token_id=tm.EOS_ID,
        eos_token_id=tm.EOS_ID,
        pad_token_id=tm.PAD_ID,
        output_router_logits=False,
    )


def main() -> int:
    repo_root = Path(__file__).resolve().parents[2]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(repo_root / "testdata" / "tiny"), help="output folder")
    args = ap.parse_args()

    import numpy as np
    import safetensors
    import tokenizers
    import torch
    import transformers
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.set_grad_enabled(False)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    cfg = config()
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    tm.randomize(model, SEED)
    g = torch.Generator().manual_seed(SEED + 1)
    for layer in model.model.layers:
        layer.self_attn.sinks.copy_(torch.randn(layer.self_attn.sinks.shape, generator=g))

    failures, notes = [], []
    d = Path(args.out) / "gpt_oss"
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    model.save_pretrained(d)
    (d / "tokenizer.json").write_text(tm.tokenizer_json())
    recs = tm.run_prompts(model, failures, "gpt_oss")

    def variant(change):
        m = copy.deepcopy(model)
        change(m)
        return tm.forward_all(m)

    def set_sinks(m):
        for layer in m.model.layers:
            layer.self_attn.sinks.fill_(-1e4)

    def set_limit(m):
        for layer in m.model.layers:
            layer.mlp.experts.limit = 1e4

    def set_window(m):
        for layer in m.model.layers:
            if layer.self_attn.sliding_window is not None:
                layer.self_attn.sliding_window = 10_000
        m.config.sliding_window = 10_000

    def plain_rope(m):
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

        c = copy.deepcopy(m.config)
        c.rope_parameters = {"rope_type": "default", "rope_theta": 150000.0}
        m.model.rotary_emb = GptOssRotaryEmbedding(c)

    for what, change in [("sinks", set_sinks), ("swiglu clamp", set_limit), ("sliding window", set_window), ("yarn", plain_rope)]:
        other = variant(change)
        diffs = [float((other[i] - recs[i]["_logits"]).abs().max()) for i in range(len(recs))]
        notes.append(f"without the {what}: max |logit change| per prompt {['%.3g' % v for v in diffs]}")
        if diffs[-1] < 1e-3:
            failures.append(f"the {what} does not change the long prompt's logits: {diffs}")

    re = tm.load_back(d, model, failures)
    for i, lg in enumerate(tm.forward_all(re)):
        if not torch.equal(lg, recs[i]["_logits"]):
            failures.append(f"reloaded model's logits differ for p{i}")

    st = load_file(str(d / "model.safetensors"))
    files = {f.name: tm.sha256_of(f) for f in sorted(d.iterdir()) if f.name != "golden.json"}
    doc = {
        "name": "gpt_oss",
        "architecture": model.config.architectures[0],
        "model_type": model.config.model_type,
        "exercises": "gpt-oss: attention sinks, alternating sliding (8) / full layers, YaRN without truncation, "
        "4 experts top-2 (softmax over the chosen router logits) with biases, the clamped SwiGLU "
        "(limit 0.5 so it binds), q/k/v/o biases, untied lm_head",
        "versions": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "tokenizers": tokenizers.__version__,
            "safetensors": safetensors.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "device": "cpu",
        "dtype": "float32",
        "attn_implementation": "eager",
        "torch_threads": 1,
        "seed": SEED,
        "init": {"matrix_std": tm.WEIGHT_STD, "bias_std": tm.BIAS_STD, "norm_weight": f"1 + N(0, {tm.NORM_STD}^2)",
                 "sinks": "N(0, 1)"},
        "n_params": sum(v.numel() for v in st.values()),
        "tensors": {k: list(v.shape) for k, v in sorted(st.items())},
        "vocab_size": tm.VOCAB_SIZE,
        "new_tokens": tm.NEW_TOKENS,
        "generation": "greedy (do_sample=False), KV cache, eos_token_id=None: exactly new_tokens tokens",
        "feature_checks": notes,
        "files_sha256": files,
        "prompts": [{k: v for k, v in r.items() if not k.startswith("_")} for r in recs],
    }
    (d / "golden.json").write_text(json.dumps(doc, indent=1) + "\n")
    size = sum(f.stat().st_size for f in d.iterdir())
    print(f"tiny: gpt_oss {doc['n_params']} params, {size / 1024:.1f} KiB", flush=True)
    for n in notes:
        print("tiny: note:", n)
    if size >= 1 << 20:
        failures.append(f"gpt_oss: {size} bytes, over 1 MiB")
    for f in failures:
        print("tiny: FAIL:", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
