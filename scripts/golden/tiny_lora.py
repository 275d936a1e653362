#!/usr/bin/env python3
"""Tiny LoRA adapters (PEFT layout) on the tiny checkpoints, with golden outputs.

For each adapter below this script loads testdata/tiny/<model> with
transformers (eager attention, float32, CPU), wraps it with peft's
LoraConfig, fills every lora_A and lora_B matrix from a fixed-seed
generator (peft's own init leaves B at zero, which would make the adapter a
no-op that any kernel passes), saves it with save_pretrained into
testdata/tiny/<model>/<adapter>/ (adapter_config.json,
adapter_model.safetensors) and writes golden.json there with, for the three
prompts of tiny_models.py:

  * last_logits: the adapted model's logits at the last prompt position
    (transformers + peft, unmerged);
  * merged_last_logits: the same from the merged model (merge_and_unload),
    a second reference computed differently;
  * argmax: the adapted model's argmax at every position;
  * greedy: 16 greedy new tokens of the adapted model (EOS ignored);
  * base_max_abs_diff: how far the adapter moves the last logits from the
    base model's (the script fails when it is below 0.05, so a kernel that
    skips the delta cannot pass).

Adapters (chosen to exercise what the loader must get right):

  llama/lora_a   q_proj, v_proj; r 4, alpha 8
  llama/lora_b   "all-linear"; r 8, alpha 16, use_rslora (scale alpha/sqrt(r))
  llama/lora_c   k_proj, o_proj, gate/up/down; r 4, alpha 4, rank_pattern
                 down_proj: 2, alpha_pattern k_proj: 12
  qwen3/lora     "all-linear"; r 8, alpha 16 (q/k norms after the delta)
  phi3/lora      fused qkv_proj and gate_up_proj, o_proj, down_proj; r 4, alpha 8
  gpt2/lora      fused c_attn (Conv1D), c_proj, c_fc; r 4, alpha 8
  mixtral/lora_attn  q/k/v/o_proj only on a mixture-of-experts model; r 4, alpha 8
  mixtral/lora   "all-linear": peft 0.21 with transformers 5 adds the router
                 (gate.weight) and the experts' fused gate_up_proj (rank and
                 alpha doubled by '.*\\.gate_up_proj' patterns) and down_proj
                 as target_parameters; r 4, alpha 8
  qwen3moe/lora  q_proj, o_proj and target_parameters mlp.gate.weight,
                 mlp.experts.gate_up_proj, mlp.experts.down_proj; r 4,
                 alpha 8, use_rslora
  qwen3moe/lora_down  target_parameters mlp.experts.down_proj alone; r 2, alpha 6
  qwen2/lora     "all-linear"; r 8, alpha 16 (q/k/v carry biases: the delta adds
                 to a biased projection)
  mistral/lora   q/k/v/o_proj, down_proj; r 4, alpha 16, use_rslora (llama's
                 shape with a sliding window)
  opt/lora       q/k/v_proj, out_proj, fc1, fc2 (OPT's names, biased, pre-norm
                 layers; the tiny model's project_in/project_out are left alone:
                 kiln does not adapt them); r 4, alpha 8
  opt-postln/lora  the same on OPT-350m's post-norm layers
  gemma2/lora    "all-linear"; r 8, alpha 16 (sandwich norms, attention and
                 final softcaps, alternating sliding layers)
  gemma3/lora    "all-linear"; r 8, alpha 16, use_rslora (q/k norms after the
                 delta, five sliding layers to one global, two rope bases)
  gemma3/lora_qko  q_proj and k_proj, right before the q/k norms, and o_proj
                 (without it a one-token prompt, whose attention weights are
                 all 1, would not move); r 4 (k_proj 2 by rank_pattern), alpha 8
  qwen2moe/lora  biased q/k/v/o_proj and target_parameters mlp.gate.weight,
                 mlp.experts.gate_up_proj, mlp.experts.down_proj beside the
                 shared expert (which kiln does not adapt); r 4, alpha 8

adapter_config.json's target_modules is written sorted (peft writes it in
set order, which differs from run to run); the weights and goldens are
reproducible as they are.

Run after tiny_models.py and tiny_gemma.py (which rewrite the model
directories and so remove the adapters; the goldens depend on their
weights). From the
repository root, about 25 seconds (--only mixtral qwen3moe writes just
those models' adapters; the directory name is the model, e.g. opt-postln):

    HF_HUB_OFFLINE=1 ${KILN_CACHE:-$HOME/.cache/kiln}/venv-golden/bin/python \\
        scripts/golden/tiny_lora.py [--out testdata/tiny] [--only MODEL ...]
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import NEW_TOKENS, PROMPTS, f32, greedy_config  # noqa: E402

SEED = 20261206
LORA_STD = 0.1
MIN_EFFECT = 0.05

ADAPTERS = [
    ("llama", "lora_a", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
    ("llama", "lora_b", dict(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True)),
    (
        "llama",
        "lora_c",
        dict(
            r=4,
            lora_alpha=4,
            target_modules=["k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            rank_pattern={"down_proj": 2},
            alpha_pattern={"k_proj": 12},
        ),
    ),
    ("qwen3", "lora", dict(r=8, lora_alpha=16, target_modules="all-linear")),
    ("phi3", "lora", dict(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])),
    ("gpt2", "lora", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    ("mixtral", "lora_attn", dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
    ("mixtral", "lora", dict(r=4, lora_alpha=8, target_modules="all-linear")),
    (
        "qwen3moe",
        "lora",
        dict(
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=["q_proj", "o_proj"],
            target_parameters=["mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        ),
    ),
    ("qwen3moe", "lora_down", dict(r=2, lora_alpha=6, target_modules=[], target_parameters=["mlp.experts.down_proj"])),
    # Appended after the adapters above so their seeds (SEED + index) stay put.
    ("qwen2", "lora", dict(r=8, lora_alpha=16, target_modules="all-linear")),
    (
        "mistral",
        "lora",
        dict(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], use_rslora=True),
    ),
    ("opt", "lora", dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])),
    (
        "opt-postln",
        "lora",
        dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
    ),
    ("gemma2", "lora", dict(r=8, lora_alpha=16, target_modules="all-linear")),
    ("gemma3", "lora", dict(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True)),
    ("gemma3", "lora_qko", dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "o_proj"], rank_pattern={"k_proj": 2})),
    (
        "qwen2moe",
        "lora",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            target_parameters=["mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        ),
    ),
]


def main() -> int:
    import peft
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="testdata/tiny")
    ap.add_argument("--only", nargs="*", metavar="MODEL", help="write only the adapters of these models")
    args = ap.parse_args()
    out = Path(args.out)
    torch.set_num_threads(1)
    failures = []
    for idx, (model_name, name, kw) in enumerate(ADAPTERS):
        if args.only and model_name not in args.only:
            continue
        base_dir = out / model_name
        load = lambda: AutoModelForCausalLM.from_pretrained(  # noqa: E731
            base_dir, attn_implementation="eager", dtype=torch.float32
        ).eval()
        base = load()
        base_logits = [base(input_ids=torch.tensor([p]), use_cache=False).logits[0] for p in PROMPTS]
        cfg = LoraConfig(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **kw)
        model = get_peft_model(load(), cfg).eval()
        g = torch.Generator().manual_seed(SEED + idx)
        params = {n: p for n, p in model.named_parameters() if "lora_" in n}
        with torch.no_grad():
            for n in sorted(params):
                params[n].copy_(torch.randn(params[n].shape, generator=g) * LORA_STD)
        d = base_dir / name
        if d.exists():
            shutil.rmtree(d)
        model.peft_config["default"].base_model_name_or_path = f"testdata/tiny/{model_name}"
        model.save_pretrained(d)
        (d / "README.md").unlink(missing_ok=True)  # peft's empty model card
        # peft writes target_modules in set order, which changes with Python's
        # string hashing from run to run: sort it so reruns are byte-identical.
        cfg_path = d / "adapter_config.json"
        saved = json.loads(cfg_path.read_text())
        if isinstance(saved.get("target_modules"), list):
            saved["target_modules"] = sorted(saved["target_modules"])
            cfg_path.write_text(json.dumps(saved, indent=2, sort_keys=True))
        merged = get_peft_model(load(), cfg)
        merged.load_state_dict(model.state_dict())
        merged = merged.merge_and_unload().eval()
        gen_cfg = greedy_config(model.base_model.model)
        recs = []
        for i, ids in enumerate(PROMPTS):
            x = torch.tensor([ids])
            with torch.no_grad():
                logits = model(input_ids=x, use_cache=False).logits[0]
                m_logits = merged(input_ids=x, use_cache=False).logits[0]
                gen = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=gen_cfg)
            greedy = gen.sequences[0].tolist()[len(ids):]
            if len(greedy) != NEW_TOKENS:
                failures.append(f"{model_name}/{name} p{i}: {len(greedy)} tokens")
            effect = float((logits[-1] - base_logits[i][-1]).abs().max())
            merged_diff = float((logits[-1] - m_logits[-1]).abs().max())
            if effect < MIN_EFFECT:
                failures.append(f"{model_name}/{name} p{i}: the adapter moves the logits by only {effect}")
            if merged_diff > 1e-4:
                failures.append(f"{model_name}/{name} p{i}: merged and unmerged differ by {merged_diff}")
            recs.append(
                {
                    "ids": ids,
                    "last_logits": [f32(v) for v in logits[-1].tolist()],
                    "merged_last_logits": [f32(v) for v in m_logits[-1].tolist()],
                    "argmax": logits.argmax(-1).tolist(),
                    "greedy": greedy,
                    "base_max_abs_diff": effect,
                    "merged_max_abs_diff": merged_diff,
                }
            )
        doc = {
            "model": model_name,
            "adapter": name,
            "lora_config": {k: v for k, v in kw.items()},
            "seed": SEED + idx,
            "init": f"every lora_A/lora_B ~ N(0, {LORA_STD}^2), sorted name order",
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
            },
            "new_tokens": NEW_TOKENS,
            "prompts": recs,
        }
        (d / "golden.json").write_text(json.dumps(doc, indent=1) + "\n")
        print(f"{model_name}/{name}: effect {min(r['base_max_abs_diff'] for r in recs):.3f}, "
              f"merged diff {max(r['merged_max_abs_diff'] for r in recs):.2e}")
    for f in failures:
        print("FAIL", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
