#!/usr/bin/env python3
"""Reference YaRN rotary tables, for kiln-model's tests/yarn.rs.

For a few configs that use `rope_type: "yarn"` (gpt-oss's, a Qwen-style
long-context one, a DeepSeek-style one with mscale/mscale_all_dim, one with
an explicit attention_factor and a partial rotary factor), transformers'
own code computes the inverse frequencies and the attention factor
(`ROPE_INIT_FUNCTIONS["yarn"]`, i.e. `_compute_yarn_parameters`) and the
model's rotary embedding module its cos/sin at a few positions. They go to
testdata/golden/yarn.json with the config.json each came from.

    HF_HUB_OFFLINE=1 ${KILN_CACHE:-$HOME/.cache/kiln}/venv-golden/bin/python scripts/golden/yarn_golden.py

(the venv of scripts/golden/requirements.txt; nothing is downloaded).
"""
import argparse
import json
import pathlib

import torch
import transformers
from transformers import GptOssConfig, LlamaConfig, Qwen2Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

POSITIONS = [0, 1, 7, 100, 4095, 5000, 70000]

# Each case: a name, the config class, its rotary module, and the config.json
# fields (as a published config.json writes them).
CASES = [
    (
        "gpt_oss",
        GptOssConfig,
        GptOssRotaryEmbedding,
        {
            "model_type": "gpt_oss",
            "hidden_size": 2880,
            "num_attention_heads": 64,
            "num_key_value_heads": 8,
            "head_dim": 64,
            "max_position_embeddings": 131072,
            "rope_theta": 150000,
            "rope_scaling": {
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "factor": 32.0,
                "original_max_position_embeddings": 4096,
                "rope_type": "yarn",
                "truncate": False,
            },
        },
    ),
    (
        "qwen2_yarn",
        Qwen2Config,
        Qwen2RotaryEmbedding,
        {
            "model_type": "qwen2",
            "hidden_size": 1024,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "max_position_embeddings": 131072,
            "rope_theta": 1000000.0,
            "rope_scaling": {
                "type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 32768,
            },
        },
    ),
    (
        "deepseek_style_mscale",
        LlamaConfig,
        LlamaRotaryEmbedding,
        {
            "model_type": "llama",
            "hidden_size": 512,
            "num_attention_heads": 8,
            "head_dim": 64,
            "max_position_embeddings": 163840,
            "rope_theta": 10000,
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 40,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 0.707,
                "mscale_all_dim": 0.707,
                "original_max_position_embeddings": 4096,
            },
        },
    ),
    (
        "explicit_attention_factor_partial",
        LlamaConfig,
        LlamaRotaryEmbedding,
        {
            "model_type": "llama",
            "hidden_size": 768,
            "num_attention_heads": 12,
            "max_position_embeddings": 16384,
            "rope_theta": 500000.0,
            "partial_rotary_factor": 0.5,
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 8.0,
                "attention_factor": 1.25,
                "beta_fast": 16,
                "beta_slow": 2,
                "original_max_position_embeddings": 2048,
            },
        },
    ),
]


def case(name, cls, rotary_cls, fields):
    kwargs = {k: v for k, v in fields.items() if k != "model_type"}
    cfg = cls(**kwargs)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    rot = rotary_cls(cfg)
    x = torch.zeros(1, dtype=torch.float32)
    pos = torch.tensor([POSITIONS], dtype=torch.long)
    cos, sin = rot(x, pos)
    half = inv_freq.shape[0]
    return {
        "name": name,
        "config": fields,
        "inv_freq": [float(v) for v in inv_freq],
        "attention_factor": float(attention_factor),
        "positions": POSITIONS,
        # The rotary modules return [cos(f), cos(f)] (llama) or cos(f)
        # (gpt-oss) per position: the first half is each frequency once.
        "cos": [[float(v) for v in row[:half]] for row in cos[0]],
        "sin": [[float(v) for v in row[:half]] for row in sin[0]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    root = pathlib.Path(__file__).resolve().parents[2]
    ap.add_argument("--out", default=root / "testdata/golden/yarn.json", type=pathlib.Path)
    args = ap.parse_args()
    out = {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "cases": [case(*c) for c in CASES],
    }
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
