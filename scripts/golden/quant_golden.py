#!/usr/bin/env python3
"""Reference dequantization of ggml block formats, for kiln's quant tests.

For each block type kiln reads, a few blocks of seeded random bytes (with
their f16 scales set to moderate values so every element is finite) are
dequantized by the `gguf` package (llama.cpp's own Python reference, the
same code `transformers` uses to read GGUF files). The bytes (hex) and the
expected float32 values go to testdata/golden/quant_blocks.json.

    ${KILN_CACHE:-$HOME/.cache/kiln}/venv-golden/bin/python scripts/golden/quant_golden.py

(the venv of scripts/golden/requirements.txt; only gguf and numpy are used).
"""
import argparse
import json
import pathlib

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize

# Byte offsets of each format's f16 scale (and minimum) within a block.
F16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
    T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208], T.Q2_K: [80, 82], T.Q3_K: [108],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="testdata/golden/quant_blocks.json")
    args = ap.parse_args()
    rng = np.random.default_rng(20261125)
    cases = []
    for ty, fields in F16_FIELDS.items():
        block, type_size = GGML_QUANT_SIZES[ty]
        n_blocks = 3
        raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
        for b in range(n_blocks):
            for off in fields:
                scale = np.float16(rng.uniform(-0.5, 0.5))
                raw[b, off:off + 2] = np.frombuffer(scale.tobytes(), dtype=np.uint8)
        values = dequantize(raw.reshape(1, -1), ty).reshape(-1).astype(np.float32)
        assert values.size == n_blocks * block and np.isfinite(values).all()
        cases.append({
            "type": ty.name,
            "bytes_hex": raw.tobytes().hex(),
            "values": [float(v) for v in values],
        })
    out = pathlib.Path(args.out)
    out.write_text(json.dumps({"generator": "gguf.quants.dequantize", "cases": cases}, separators=(",", ":")))
    print(f"wrote {out} ({out.stat().st_size} bytes, {len(cases)} types)")


if __name__ == "__main__":
    main()
