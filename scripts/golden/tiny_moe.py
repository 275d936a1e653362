#!/usr/bin/env python3
"""Tiny random-weight mixture-of-experts checkpoints, with golden outputs.

The mixture-of-experts companion of tiny_models.py (whose tokenizer, prompts,
seeded weight fill, golden.json format and checks it imports and reuses):
Qwen3-MoE, Mixtral and Qwen2-MoE, 2 layers, hidden 64, 4 heads (GQA 4/2),
vocab 320, float32, eager attention, every layer a mixture-of-experts layer
with top-2 routing, saved with save_pretrained into testdata/tiny/<name>/.

transformers 5 keeps experts in memory as fused 3-D parameters
(`experts.gate_up_proj` [E, 2*ff, hidden], `experts.down_proj`
[E, hidden, ff]) but `save_pretrained` writes them back per expert
(`mlp.experts.E.gate_proj.weight`, Mixtral's
`block_sparse_moe.experts.E.w1/w3/w2.weight`): the files hold the per-expert
names (checked here).

Checks beyond tiny_models.py's (the script fails if one does not hold):
  * over the golden sequences (each prompt followed by its greedy tokens),
    every expert of every layer is chosen by some token, and the chosen sets
    differ between tokens (the router matters);
  * the smallest margin between the k-th and (k+1)-th router probability
    over those sequences is recorded as `min_router_margin` in golden.json
    and must be above 2e-5, so float32 summation order cannot flip an
    expert choice;
  * qwen3moe: norm_topk_prob is true and turning it off changes the logits;
  * qwen2moe: the shared expert and its sigmoid gate are there, and zeroing
    the gate's weight (sigmoid 0.5) changes the logits; norm_topk_prob false;
  * mixtral: the router renormalises its top-2 (the weights of a token sum to 1).

Run (from the repository root; a few seconds on 2 cores):

    HF_HUB_OFFLINE=1 ${KILN_CACHE:-$HOME/.cache/kiln}/venv-golden/bin/python \\
        scripts/golden/tiny_moe.py [--out testdata/tiny]
"""

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_models as tm  # noqa: E402
import tiny_golden as tg  # noqa: E402

SEED = tm.SEED + 100
TOP_K = 2
# Router probabilities of kiln and transformers differ by ~1e-7 (float32 summation order); a
# margin this far above that cannot flip an expert choice.
MIN_MARGIN = 2e-5


def build_configs():
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    common = dict(
        tm.COMMON,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=tm.MAX_POS,
        tie_word_embeddings=False,
        num_experts_per_tok=TOP_K,
    )
    return [
        (
            "qwen3moe",
            Qwen3MoeConfig(
                **common,
                head_dim=16,
                intermediate_size=128,
                moe_intermediate_size=32,
                num_experts=8,
                norm_topk_prob=True,
                decoder_sparse_step=1,
                mlp_only_layers=[],
                rms_norm_eps=1e-6,
                use_sliding_window=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            ),
            "Qwen3MoeForCausalLM: 8 experts of intermediate size 32 in both layers, top-2 routing: softmax "
            "over the 8 router logits, top-2, renormalised (norm_topk_prob=true); per-head q/k RMSNorm as "
            "Qwen3, GQA 4/2, head_dim 16, untied lm_head. Experts saved per expert "
            "(mlp.experts.E.{gate,up,down}_proj), router mlp.gate.",
        ),
        (
            "mixtral",
            MixtralConfig(
                **common,
                intermediate_size=32,
                num_local_experts=4,
                rms_norm_eps=1e-5,
                sliding_window=None,
                router_jitter_noise=0.0,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            ),
            "MixtralForCausalLM: 4 experts of intermediate size 32 (w1 gate, w3 up, w2 down), top-2 of "
            "the softmax renormalised (= softmax over the top-2 logits), router block_sparse_moe.gate; "
            "llama attention (GQA 4/2), no sliding window, untied lm_head.",
        ),
        (
            "qwen2moe",
            Qwen2MoeConfig(
                **common,
                intermediate_size=128,
                moe_intermediate_size=32,
                shared_expert_intermediate_size=48,
                num_experts=4,
                norm_topk_prob=False,
                decoder_sparse_step=1,
                mlp_only_layers=[],
                rms_norm_eps=1e-6,
                use_sliding_window=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            ),
            "Qwen2MoeForCausalLM: 4 experts of intermediate size 32, top-2 of the softmax NOT "
            "renormalised (norm_topk_prob=false), plus a shared expert (intermediate 48) every token "
            "goes through, scaled by sigmoid(shared_expert_gate(x)); q/k/v biases as Qwen2, GQA 4/2, "
            "untied lm_head.",
        ),
    ]


class RouterProbe:
    """Records every router's logits (forward hooks on the *TopKRouter modules)."""

    def __init__(self, model):
        self.logits = []
        self.handles = [
            m.register_forward_hook(self.hook) for m in model.modules() if type(m).__name__.endswith("TopKRouter")
        ]
        assert len(self.handles) == model.config.num_hidden_layers, len(self.handles)

    def hook(self, module, inputs, output):
        self.logits.append(output[0].detach().clone())

    def close(self):
        for h in self.handles:
            h.remove()


def router_checks(name, model, recs, failures, notes):
    """Over every golden sequence (prompt + greedy tokens, one full pass each): every expert of every
    layer is used, and the smallest k-th/(k+1)-th router probability margin."""
    import torch

    probe = RouterProbe(model)
    for r in recs:
        full = torch.tensor([r["ids"] + r["greedy"]], dtype=torch.long)
        model(input_ids=full, attention_mask=torch.ones_like(full), use_cache=False)
    n_layers = model.config.num_hidden_layers
    margins = []
    for lg in probe.logits:
        p = torch.softmax(lg.float(), dim=-1)
        top = p.topk(TOP_K + 1, dim=-1).values
        margins.append(float((top[:, TOP_K - 1] - top[:, TOP_K]).min()))
    per_layer = [torch.cat(probe.logits[layer::n_layers]) for layer in range(n_layers)]
    for layer, lg in enumerate(per_layer):
        chosen = lg.topk(TOP_K, dim=-1).indices
        used = set(chosen.flatten().tolist())
        n_experts = lg.shape[-1]
        if used != set(range(n_experts)):
            failures.append(f"{name}: layer {layer} uses experts {sorted(used)} of {n_experts}")
        sets = {tuple(sorted(r)) for r in chosen.tolist()}
        if len(sets) < 2:
            failures.append(f"{name}: layer {layer} routes every token to the same experts")
    probe.close()
    m = min(margins)
    notes.append(f"{name}: smallest k-th vs (k+1)-th router probability margin {m:.3g}")
    if m < MIN_MARGIN:
        failures.append(f"{name}: router margin {m} too small for a stable golden")
    return m


def feature_checks(name, cfg, model, recs, failures, notes):
    import torch
    from transformers import AutoModelForCausalLM

    def variant(**changes):
        c = copy.deepcopy(cfg)
        for k, v in changes.items():
            setattr(c, k, v)
        m = AutoModelForCausalLM.from_config(c, attn_implementation="eager", dtype=torch.float32)
        m.load_state_dict(model.state_dict())
        m.eval()
        return m

    def change(m):
        return max(float((a - r["_logits"]).abs().max()) for a, r in zip(tm.forward_all(m), recs))

    if model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr():
        failures.append(f"{name}: lm_head is tied but should not be")
    if name == "qwen3moe":
        if cfg.norm_topk_prob is not True:
            failures.append("qwen3moe: norm_topk_prob is not on")
        d = change(variant(norm_topk_prob=False))
        notes.append(f"qwen3moe: max |logit change| without norm_topk_prob: {d:.3g}")
        if d < 1e-2:
            failures.append("qwen3moe: norm_topk_prob does not change the logits")
    if name == "qwen2moe":
        mlp = model.model.layers[0].mlp
        if not hasattr(mlp, "shared_expert") or not hasattr(mlp, "shared_expert_gate"):
            failures.append("qwen2moe: no shared expert")
        if cfg.norm_topk_prob is not False:
            failures.append("qwen2moe: norm_topk_prob should be off")
        m = variant()
        with torch.no_grad():
            for layer in m.model.layers:
                layer.mlp.shared_expert_gate.weight.zero_()
        d = change(m)
        notes.append(f"qwen2moe: max |logit change| with the shared expert gate at sigmoid(0): {d:.3g}")
        if d < 1e-2:
            failures.append("qwen2moe: the shared expert gate does not change the logits")
    if name == "mixtral":
        x = torch.randn(5, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
        _, w, _ = model.model.layers[0].mlp.gate(x)
        if float((w.sum(-1) - 1).abs().max()) > 1e-6:
            failures.append("mixtral: the router's top-2 weights do not sum to 1")


README_HEADER = "## Mixture-of-experts models"


def write_readme_section(out: Path, summary):
    """Replaces (or appends) this script's section at the end of README.md, which tiny_models.py
    writes: rerun this script after that one."""
    readme = out / "README.md"
    text = readme.read_text() if readme.exists() else ""
    if README_HEADER in text:
        text = text[: text.index(README_HEADER)]
    lines = [README_HEADER, ""]
    lines.append(
        "Written by `scripts/golden/tiny_moe.py` (run it after `tiny_models.py`, which rewrites this "
        "file above this section) with the same tokenizer, prompts, weight fill and golden.json format, "
        "plus `min_router_margin`: the smallest gap between the k-th and (k+1)-th router probability "
        "over every golden sequence (prompt + greedy tokens), checked > 2e-5 so float32 summation order "
        "cannot flip an expert choice. Every expert of every layer is chosen by some token. "
        "`save_pretrained` writes experts per expert (`mlp.experts.E.gate_proj.weight`, Mixtral's "
        "`block_sparse_moe.experts.E.w1.weight`), not transformers 5's fused in-memory "
        "`experts.gate_up_proj`.\n"
    )
    lines.append("| directory | params | size | min top-2 gap | min router margin | exercises |")
    lines.append("|---|---|---|---|---|---|")
    for name, n, size, gap, margin, exercises in summary:
        lines.append(f"| `{name}/` | {n} | {size / 1024:.0f} KiB | {gap:.3g} | {margin:.3g} | {exercises} |")
    lines.append("")
    readme.write_text(text.rstrip("\n") + "\n\n" + "\n".join(lines))


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
    failures, notes, summary = [], [], []
    out.mkdir(parents=True, exist_ok=True)
    for idx, (name, cfg, exercises) in enumerate(build_configs()):
        seed = SEED + idx
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
        model.eval()
        tm.randomize(model, seed)
        d = out / name
        tg.save_checkpoint(model, d, tok_json)

        recs = tm.run_prompts(model, failures, name)
        feature_checks(name, model.config, model, recs, failures, notes)
        margin = router_checks(name, model, recs, failures, notes)

        tm.check_reload(d, model, recs, failures, name)

        st = load_file(str(d / "model.safetensors"))
        if any("gate_up_proj" in k for k in st):
            failures.append(f"{name}: save_pretrained wrote fused expert tensors")
        if not any(".experts.0." in k for k in st):
            failures.append(f"{name}: no per-expert tensors in the file")
        init = {"matrix_std": tm.WEIGHT_STD, "bias_std": tm.BIAS_STD, "norm_weight": f"1 + N(0, {tm.NORM_STD}^2)"}
        common = tg.common_fields(model, st, recs, versions, seed, init)
        n_params = common["n_params"]
        tg.write_golden(
            d,
            dict(
                common,
                name=name,
                exercises=exercises,
                min_router_margin=tm.f32(margin),
                legacy_config_fields=tm.legacy_config_fields(model.config),
                vocab_size=tm.VOCAB_SIZE,
                new_tokens=tm.NEW_TOKENS,
            ),
        )
        size = sum(f.stat().st_size for f in d.iterdir())
        min_gap, _ = tg.record_stats(recs)
        print(
            f"tiny_moe: {name:9s} {n_params:7d} params, {size / 1024:6.1f} KiB, min top-2 gap {min_gap:.4f}, "
            f"router margin {margin:.3g}",
            flush=True,
        )
        summary.append((name, n_params, size, min_gap, margin, exercises))
        if size >= 1 << 20:
            failures.append(f"{name}: {size} bytes, over 1 MiB")
    write_readme_section(out, summary)
    for n in notes:
        print("tiny_moe: note:", n)
    for f in failures:
        print("tiny_moe: FAIL:", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
