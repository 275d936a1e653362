#!/usr/bin/env python3
"""Tiny LoRA adapters (PEFT layout) on the tiny gpt-oss checkpoint, with golden outputs.

The gpt-oss companion of tiny_lora.py: its adapter loop (peft's LoraConfig,
every lora_A/lora_B filled from a fixed-seed generator, save_pretrained,
golden.json with the unmerged and merged last logits, per-position argmax
and 16 greedy tokens, and the checks that the adapter moves the logits by
at least 0.05 and that merged and unmerged agree) is run here on this
script's own adapter list, by importing tiny_lora and handing it the list.

gpt-oss is the family where the adapter must get the experts' layout right:
`mlp.experts.gate_up_proj` is `[E, hidden, 2 * ff]` (inputs first, the
transpose of Mixtral's; transformers marks the experts `is_transposed`),
with each expert's gate and up outputs interleaved on the last axis (gate
the even columns, up the odd ones) and a bias added before the clamped
SwiGLU, and `mlp.experts.down_proj` is `[E, ff, hidden]`. peft 0.21.2's
ParamWrapper reads (in, out) from the last two axes of such a parameter and
lays out lora_A as `[E * r, in]` (expert e's A in rows e*r..(e+1)*r) and
lora_B as `[out, E * r]` (expert e's B in columns k*E + e), its delta
`einsum("o r e, e r i -> e i o")` added to the weight, so before the bias,
the clamp and the SwiGLU. The router `mlp.router` is not an nn.Linear
(GptOssTopKRouter holds `weight` `[E, hidden]` and `bias`) and is reached
only through target_parameters `mlp.router.weight`.

Adapters, written to testdata/tiny/gpt_oss/<adapter>/:

  gpt_oss/lora_attn     q/k/v/o_proj (biased projections, sinks, sliding layer); r 4, alpha 8
  gpt_oss/lora          q/k/v/o_proj and target_parameters mlp.router.weight,
                        mlp.experts.gate_up_proj, mlp.experts.down_proj; r 4, alpha 8
  gpt_oss/lora_experts  the router and the experts alone (no attention), so the
                        expert deltas must move the logits by themselves;
                        r 2, alpha 6, use_rslora

Run after tiny_gpt_oss.py (which rewrites testdata/tiny/gpt_oss and so
removes the adapters). From the repository root, a few seconds:

    HF_HUB_OFFLINE=1 ${KILN_CACHE:-$HOME/.cache/kiln}/venv-golden/bin/python \\
        scripts/golden/tiny_lora_gpt_oss.py [--out testdata/tiny]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_lora  # noqa: E402

EXPERTS = ["mlp.router.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]

ADAPTERS = [
    ("gpt_oss", "lora_attn", dict(r=4, lora_alpha=8, target_modules=ATTENTION)),
    ("gpt_oss", "lora", dict(r=4, lora_alpha=8, target_modules=ATTENTION, target_parameters=EXPERTS)),
    (
        "gpt_oss",
        "lora_experts",
        dict(r=2, lora_alpha=6, use_rslora=True, target_modules=[], target_parameters=EXPERTS),
    ),
]


def main() -> int:
    # tiny_lora.main walks tiny_lora.ADAPTERS (seed SEED + index in that list).
    tiny_lora.ADAPTERS = ADAPTERS
    return tiny_lora.main()


if __name__ == "__main__":
    sys.exit(main())
