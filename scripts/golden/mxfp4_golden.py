#!/usr/bin/env python3
"""Reference data for kiln's MXFP4 support, from the two implementations
users run: llama.cpp's Python reference (`gguf.quants`, ggml's block
layout, type 39) and transformers' own decoding of gpt-oss's safetensors
layout (`transformers.integrations.mxfp4.convert_moe_packed_tensors`).

Writes testdata/golden/mxfp4.json with three cases:

- `dequantize`: seeded random ggml blocks (exponents spread over a wide
  range, including the subnormal scales 0 and 1) and their values as
  `gguf.quants.dequantize` gives them;
- `quantize`: seeded random f32 rows (with an all-zero block, values on
  the grid and halfway between grid points) and the block bytes
  `gguf.quants.quantize` writes for them;
- `hf`: a `<name>_blocks` / `<name>_scales` pair with a leading expert
  dimension, as gpt-oss stores its experts, and the float32 weights
  transformers decodes from it (`[experts, cols, rows]`, its layout).

    HF_HUB_OFFLINE=1 ${KILN_CACHE:-$HOME/.cache/kiln}/venv-golden/bin/python scripts/golden/mxfp4_golden.py
"""
import argparse
import json
import pathlib

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize, quantize
from transformers.integrations.mxfp4 import convert_moe_packed_tensors


def f32_hex(a: np.ndarray) -> str:
    return np.ascontiguousarray(a, dtype="<f4").tobytes().hex()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="testdata/golden/mxfp4.json")
    args = ap.parse_args()
    rng = np.random.default_rng(20261206)

    # ggml blocks: 17 bytes, the exponent first.
    raw = rng.integers(0, 256, size=(8, 17), dtype=np.uint8)
    raw[:, 0] = [0, 1, 2, 100, 120, 127, 128, 140]
    values = dequantize(raw.reshape(1, -1), T.MXFP4).reshape(-1).astype(np.float32)
    assert values.size == 8 * 32 and np.isfinite(values).all()
    deq = {"bytes_hex": raw.tobytes().hex(), "values_hex": f32_hex(values)}

    # f32 rows to quantize: 4 rows of 96.
    cols = 96
    x = (rng.standard_normal((4, cols)) * rng.uniform(0.01, 3.0, size=(4, 1))).astype(np.float32)
    x[1, 32:64] = 0.0  # an all-zero block
    x[2, :16] = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.5, -1, -1.5, -2, -3, -4, -6, 0], np.float32)
    x[2, 16:32] = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, -0.25,
                            -0.75, -1.25, -1.75, -2.5, -3.5, -5, 5.9, -5.9], np.float32)
    blocks = quantize(x, T.MXFP4)
    quant = {"cols": cols, "input_f32_hex": f32_hex(x), "bytes_hex": blocks.tobytes().hex()}

    # gpt-oss's layout: [experts, rows, cols / 32, 16] codes, two per byte
    # (element 2i in the low nibble), and [experts, rows, cols / 32] exponents.
    experts, rows, groups = 3, 5, 2
    hb = rng.integers(0, 256, size=(experts, rows, groups, 16), dtype=np.uint8)
    hs = rng.integers(118, 136, size=(experts, rows, groups), dtype=np.uint8)
    w = convert_moe_packed_tensors(torch.from_numpy(hb), torch.from_numpy(hs), dtype=torch.float32)
    w = w.numpy()
    assert w.shape == (experts, groups * 32, rows), w.shape
    hf = {
        "blocks_shape": list(hb.shape),
        "blocks_hex": hb.tobytes().hex(),
        "scales_shape": list(hs.shape),
        "scales_hex": hs.tobytes().hex(),
        "weight_shape": list(w.shape),
        "weight_hex": f32_hex(w),
    }

    out = pathlib.Path(args.out)
    out.write_text(json.dumps({
        "generator": "gguf.quants (dequantize, quantize) and "
                     "transformers.integrations.mxfp4.convert_moe_packed_tensors",
        "dequantize": deq,
        "quantize": quant,
        "hf": hf,
    }, separators=(",", ":")))
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
