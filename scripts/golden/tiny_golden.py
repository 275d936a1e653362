"""What every tiny-checkpoint script does around its model: the torch settings that make a run
byte-identical, saving the checkpoint directory, and writing its golden.json.

Shared by tiny_models.py, tiny_gemma.py and tiny_moe.py so that the three write their files the
same way (one key order for golden.json, one list of versions); each keeps only what its family
adds to the record.
"""

import hashlib
import json
import platform
import shutil
from pathlib import Path

# golden.json's keys in the order they are written; a script sets those its family has.
GOLDEN_KEYS = (
    "name",
    "architecture",
    "model_type",
    "exercises",
    "generator",
    "versions",
    "device",
    "dtype",
    "attn_implementation",
    "torch_threads",
    "seed",
    "init",
    "n_params",
    "min_router_margin",
    "tensors",
    "layer_types",
    "legacy_config_fields",
    "vocab_size",
    "new_tokens",
    "generation",
    "files_sha256",
    "prompts",
    "variants",
)

GENERATION = "greedy (do_sample=False), KV cache, eos_token_id=None: exactly new_tokens tokens"


def setup_torch():
    """One thread, deterministic kernels, no autograd, quiet transformers; returns the versions
    golden.json records."""
    import numpy as np
    import safetensors
    import tokenizers
    import torch
    import transformers

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.set_grad_enabled(False)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def save_checkpoint(model, d: Path, tok_json: str):
    """`d` emptied, then the model as save_pretrained writes it and the tokenizer."""
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    model.save_pretrained(d)
    (d / "tokenizer.json").write_text(tok_json)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def common_fields(model, st, recs, versions, seed, init):
    """The golden.json fields every family has, from the model, its saved tensors `st` and the
    prompts' records (their `_` keys dropped)."""
    return {
        "architecture": model.config.architectures[0],
        "model_type": model.config.model_type,
        "versions": versions,
        "device": "cpu",
        "dtype": "float32",
        "attn_implementation": "eager",
        "torch_threads": 1,
        "seed": seed,
        "init": init,
        "n_params": sum(v.numel() for v in st.values()),
        "tensors": {k: list(v.shape) for k, v in sorted(st.items())},
        "generation": GENERATION,
        "prompts": [{k: v for k, v in r.items() if not k.startswith("_")} for r in recs],
    }


def write_golden(d: Path, fields: dict):
    """`d/golden.json`: `fields` in GOLDEN_KEYS order, plus the sha256 of every other file in `d`."""
    unknown = set(fields) - set(GOLDEN_KEYS)
    if unknown:
        raise ValueError(f"golden.json keys not in GOLDEN_KEYS: {sorted(unknown)}")
    fields = dict(fields, files_sha256={f.name: sha256_of(f) for f in sorted(d.iterdir()) if f.name != "golden.json"})
    doc = {k: fields[k] for k in GOLDEN_KEYS if k in fields}
    (d / "golden.json").write_text(json.dumps(doc, indent=1) + "\n")


def record_stats(recs):
    """(smallest top-2 gap of any argmax or greedy step, largest KV-cached vs full-pass difference)."""
    min_gap = min(min(r["greedy_top2_gap"] + r["argmax_top2_gap"]) for r in recs)
    kv = max(r["_kv_vs_full_max_abs_diff"] for r in recs)
    return min_gap, kv
