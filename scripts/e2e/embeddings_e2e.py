#!/usr/bin/env python3
"""End-to-end test of kiln's /v1/embeddings with the official `openai` client.

    python embeddings_e2e.py path/to/kiln

Starts `kiln serve --port 0 --api-key ... --models bert=...,xlmr=...` on the
tiny encoders of testdata/tiny (scripts/golden/tiny_encoders.py), then talks
to it only through `openai.OpenAI`: client.embeddings.create with a string,
a list, token ids and lists of token ids, the client's default (base64) and
float encodings, compared with the sentence-transformers goldens; and the
client's error classes for a refused `dimensions`, an unknown model and a
missing key. Prints one line per check and exits non-zero if any failed.
Run it with scripts/e2e/run.sh.
"""

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import openai_e2e as e2e  # noqa: E402  (the shared server start and check helpers)
from openai_e2e import check, expect  # noqa: E402
from pathlib import Path

import openai
from openai import OpenAI

API_KEY = "e2e-embeddings-key"
ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "testdata" / "tiny"


def close(got, want, what):
    expect(len(got) == len(want), f"{what}: length {len(got)} != {len(want)}")
    diff = max(abs(a - b) for a, b in zip(got, want))
    expect(diff < 1e-4, f"{what}: max |diff| {diff}")


def start_server(binary):
    models = f"bert={TINY / 'bert'},xlmr={TINY / 'xlmr'}"
    return e2e.start_server(binary, ("--models", models), key=API_KEY)


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    proc, base, log = start_server(sys.argv[1])
    print(f"kiln serve at {base} (openai {openai.__version__})", flush=True)
    client = OpenAI(base_url=base + "/v1", api_key=API_KEY, timeout=60, max_retries=0)
    try:
        for name in ["bert", "xlmr"]:
            golden = json.loads((TINY / name / "golden.json").read_text())
            texts = [t["text"] for t in golden["texts"]]
            ids = [t["ids"] for t in golden["texts"]]
            want = [t["embedding"] for t in golden["texts"]]

            def one_string(name=name, texts=texts, ids=ids, want=want):
                r = client.embeddings.create(model=name, input=texts[1])
                expect(r.model == name, r.model)
                close(r.data[0].embedding, want[1], f"{name} string")
                expect(r.usage.prompt_tokens == len(ids[1]), r.usage)

            def a_list(name=name, texts=texts, ids=ids, want=want):
                for fmt in [openai.NOT_GIVEN, "float", "base64"]:
                    r = client.embeddings.create(model=name, input=texts, encoding_format=fmt)
                    expect([d.index for d in r.data] == list(range(len(texts))), r.data)
                    for d, w in zip(r.data, want):
                        if isinstance(d.embedding, str):
                            import base64
                            import struct
                            raw = base64.b64decode(d.embedding)
                            d.embedding = list(struct.unpack(f"<{len(raw) // 4}f", raw))
                        close(d.embedding, w, f"{name} list {fmt}")
                    expect(r.usage.prompt_tokens == sum(map(len, ids)), r.usage)

            def token_ids(name=name, ids=ids, want=want):
                r = client.embeddings.create(model=name, input=ids[2], encoding_format="float")
                close(r.data[0].embedding, want[2], f"{name} ids")
                r = client.embeddings.create(model=name, input=ids, encoding_format="float")
                for d, w in zip(r.data, want):
                    close(d.embedding, w, f"{name} id lists")

            check(f"{name}: embeddings.create with a string", one_string)
            check(f"{name}: a list, default/float/base64 encodings", a_list)
            check(f"{name}: token ids and lists of token ids", token_ids)

        def refused_dimensions():
            try:
                client.embeddings.create(model="bert", input="kiln", dimensions=8)
            except openai.BadRequestError as e:
                expect("dimensions" in str(e), str(e))
            else:
                raise AssertionError("dimensions on a model not marked matryoshka was accepted")

        def unknown_model():
            try:
                client.embeddings.create(model="nope", input="kiln")
            except openai.NotFoundError as e:
                expect("nope" in str(e), str(e))
            else:
                raise AssertionError("an unknown model was accepted")

        def missing_key():
            bad = OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
            try:
                bad.embeddings.create(model="bert", input="kiln")
            except openai.AuthenticationError:
                pass
            else:
                raise AssertionError("a wrong key was accepted")

        check("dimensions refused with BadRequestError", refused_dimensions)
        check("unknown model: NotFoundError", unknown_model)
        check("wrong key: AuthenticationError", missing_key)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(f"{e2e.passes} passed, {len(e2e.failures)} failed", flush=True)
    if e2e.failures:
        print("".join(log[-40:]), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
