#!/usr/bin/env python3
"""Reference quantization of f32 rows into ggml block formats, for kiln's
quantizer tests (crates/kiln-backend/tests/quantize_reference.rs).

For each format the `gguf` package can quantize (llama.cpp's own Python port
of its reference quantizers: Q8_0, Q4_0, Q4_1), seeded random rows of
normal-like weights, with a few outliers, a constant block and a zero
block, are quantized by `gguf.quants.quantize`. The f32 input (hex) and the
expected block bytes (hex) go to testdata/golden/quantize_blocks.json.
gguf has no K-quant quantizer, so Q4_K and Q6_K are checked by round trip
only.

    ${KILN_CACHE:-$HOME/.cache/kiln}/venv-golden/bin/python scripts/golden/quantize_golden.py

(the venv of scripts/golden/requirements.txt; only gguf and numpy are used).
"""
import argparse
import json
import pathlib

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize


def rows(rng: np.random.Generator) -> np.ndarray:
    x = rng.normal(0.0, 0.02, size=(4, 256)).astype(np.float32)
    x[0, 7] = 0.5  # an outlier sets its block's scale
    x[1, 40:72] = -0.125  # a constant block
    x[2, 64:96] = 0.0  # a zero block
    x[3] += 0.05  # off-centre values (Q4_1's minimum)
    return x


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="testdata/golden/quantize_blocks.json")
    args = ap.parse_args()
    rng = np.random.default_rng(20261130)
    x = rows(rng)
    cases = []
    for ty in (T.Q8_0, T.Q4_0, T.Q4_1):
        q = quantize(x, ty)
        cases.append({"type": ty.name, "bytes_hex": q.tobytes().hex()})
    out = pathlib.Path(args.out)
    out.write_text(json.dumps({
        "generator": "gguf.quants.quantize",
        "cols": int(x.shape[1]),
        "input_f32_hex": x.astype("<f4").tobytes().hex(),
        "cases": cases,
    }, separators=(",", ":")))
    print(f"wrote {out} ({out.stat().st_size} bytes, {len(cases)} types)")


if __name__ == "__main__":
    main()
