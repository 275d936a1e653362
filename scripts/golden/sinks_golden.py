#!/usr/bin/env python3
"""Reference attention with sinks (gpt-oss), for kiln-backend's tests/gptoss_ops.rs.

transformers' own `eager_attention_forward` of models/gpt_oss (the sink
logit of each query head appended to its scores, the softmax over both, the
sink's column dropped) on seeded random queries, keys and values of one
sequence, causal, without and with a sliding window, in float32; the inputs
and outputs go to testdata/golden/attention_sinks.json.

    HF_HUB_OFFLINE=1 ${KILN_CACHE:-$HOME/.cache/kiln}/venv-golden/bin/python scripts/golden/sinks_golden.py

(the venv of scripts/golden/requirements.txt; nothing is downloaded).
"""
import argparse
import json
import pathlib
from types import SimpleNamespace

import torch
import transformers
from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

HEADS, KV_HEADS, HD, LEN = 4, 2, 8, 7


def mask(window):
    """Additive mask: query i sees keys j <= i (and j > i - window)."""
    m = torch.full((LEN, LEN), float("-inf"))
    for i in range(LEN):
        lo = 0 if window is None else max(0, i + 1 - window)
        m[i, lo : i + 1] = 0.0
    return m[None, None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    root = pathlib.Path(__file__).resolve().parents[2]
    ap.add_argument("--out", default=root / "testdata/golden/attention_sinks.json", type=pathlib.Path)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(23)
    q = torch.randn(1, HEADS, LEN, HD, generator=g) * 2.0
    k = torch.randn(1, KV_HEADS, LEN, HD, generator=g)
    v = torch.randn(1, KV_HEADS, LEN, HD, generator=g)
    sinks = torch.tensor([0.5, -1.0, 2.5, 0.0])
    module = SimpleNamespace(num_key_value_groups=HEADS // KV_HEADS, sinks=sinks, training=False)
    scale = HD**-0.5
    cases = []
    for window in (None, 3):
        out, _ = eager_attention_forward(module, q, k, v, mask(window), scaling=scale)
        # out: [1, LEN, HEADS, HD] -> rows of tokens, heads * HD wide.
        cases.append({"window": window, "out": out[0].reshape(LEN, HEADS * HD).flatten().tolist()})
    doc = {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "heads": HEADS,
        "kv_heads": KV_HEADS,
        "head_dim": HD,
        "len": LEN,
        "scale": scale,
        "sinks": sinks.tolist(),
        # Rows of tokens: [LEN, heads * HD] and [LEN, kv_heads * HD].
        "q": q[0].transpose(0, 1).reshape(LEN, HEADS * HD).flatten().tolist(),
        "k": k[0].transpose(0, 1).reshape(LEN, KV_HEADS * HD).flatten().tolist(),
        "v": v[0].transpose(0, 1).reshape(LEN, KV_HEADS * HD).flatten().tolist(),
        "cases": cases,
    }
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
