#!/usr/bin/env python3
"""What 8-bit activations cost and buy on the CPU: KILN_CPU_ACTIVATIONS=int8
(llama.cpp's scheme: each 32-block of a row rounded to -127..127) against
int16 (kiln's default), which decides whether CPUs without AMX should default
to int8.

Accuracy: `kiln serve` on the default model (a real instruct model, the only
real weights here) once per setting; each chunk of a plain-English text goes
to /v1/completions with `echo` and `logprobs`, so every prompt token after the
first gets the log-probability the model gave it. Printed: perplexity per
setting, the mean and largest change of a token's log-probability, and how
often the most likely next token differs.

Speed: `kiln bench` on each GGUF given, the two settings taking turns within
every round (noise on a shared machine hits both); medians of pp and tg.

The reference is the default model's weights dequantized to an F32 GGUF
(--reference, else made with llama-quantize where scripts/bench/peers.sh
built it), which kiln multiplies in f32 with unquantized activations; with
neither, int8 is compared with int16. Each run also answers "What is the
capital of France?" greedily, and llama-server (where built) on the same
file, whose activations are 8-bit.

Usage: scripts/bench/activations.py [--text FILE] [--reference F32.gguf]
       [--threads N] [--rounds R] [--prompt-tokens P] [--gen-tokens G] [GGUF ...]
Environment: KILN (the binary; default the release build).
"""
import argparse
import http.client
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("KILN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kiln")
PEERS = CACHE / "peers" / "llama.cpp" / "build" / "bin"
# The default model as scripts/fetch-assets.sh caches it.
DEFAULT_GGUF = CACHE / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SETTINGS = ["int16", "int8"]


def kiln_binary():
    k = os.environ.get("KILN") or str(ROOT / "target" / "release" / "kiln")
    if not Path(k).exists():
        sys.exit(f"activations.py: no kiln binary at {k}; build it (cargo build --release) or set KILN")
    return k


def chunks(text, size):
    """Paragraph-aligned pieces of about `size` characters."""
    out, cur = [], ""
    for para in text.split("\n\n"):
        if cur and len(cur) + len(para) > size:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    if cur.strip():
        out.append(cur)
    return out


def request(port, method, path, body=None, timeout=600):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    c.request(method, path, body=json.dumps(body) if body is not None else None,
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data


QUESTION = "What is the capital of France?"


def chat_answer(port, model):
    """The greedy answer to QUESTION, as the server's chat template frames it."""
    body = {"temperature": 0, "max_tokens": 24, "messages": [{"role": "user", "content": QUESTION}]}
    if model:
        body["model"] = model
    status, data = request(port, "POST", "/v1/chat/completions", body)
    if status != 200:
        sys.exit(f"activations.py: /v1/chat/completions answered {status}: {data[:500]!r}")
    return json.loads(data)["choices"][0]["message"]["content"]


def start(cmd, env=None):
    """A server process whose log goes to a file (a pipe nobody reads would
    fill and stall it)."""
    log = tempfile.NamedTemporaryFile(prefix="kiln-activations.", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    proc.log = log.name
    return proc


def wait_up(port, proc, what):
    deadline = time.time() + 300
    while True:
        try:
            if request(port, "GET", "/health" if what == "llama-server" else "/ping", timeout=5)[0] == 200:
                return
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            sys.exit(f"activations.py: {what} did not come up: {Path(proc.log).read_text()[-2000:]}")
        time.sleep(0.5)


def llama_answer(server, gguf, port, threads):
    """llama-server's greedy answer to QUESTION on the same file."""
    proc = start([server, "-m", gguf, "--port", str(port), "-t", str(threads), "-c", "2048",
                  "-np", "1", "--no-webui"])
    try:
        wait_up(port, proc, "llama-server")
        return chat_answer(port, None)
    finally:
        proc.terminate()
        proc.wait()


def score(kiln, setting, pieces, port, threads, model=None):
    """Each piece's prompt tokens: (token, logprob, most likely token), from
    the default model or the GGUF `model`; and the answer to QUESTION."""
    env = dict(os.environ, KILN_CPU_ACTIVATIONS=setting)
    models = ["--models", f"reference={model}"] if model else []
    proc = start([kiln, "--threads", str(threads), "serve", "--port", str(port), *models], env)
    try:
        wait_up(port, proc, "kiln serve")
        status, data = request(port, "GET", "/v1/models")
        if status != 200:
            sys.exit(f"activations.py: /v1/models answered {status}: {data[:500]!r}")
        served = json.loads(data)["data"][0]["id"]
        rows = []
        for p in pieces:
            status, data = request(port, "POST", "/v1/completions", {
                "model": served, "prompt": p, "max_tokens": 1, "temperature": 0,
                "echo": True, "logprobs": 1})
            if status != 200:
                sys.exit(f"activations.py: /v1/completions answered {status}: {data[:500]!r}")
            lp = json.loads(data)["choices"][0]["logprobs"]
            n = len(lp["tokens"]) - 1  # the last is the generated token
            piece = []
            for i in range(1, n):
                top = lp["top_logprobs"][i] or {}
                best = max(top, key=top.get) if top else None
                piece.append((lp["tokens"][i], lp["token_logprobs"][i], best))
            rows.append(piece)
        return rows, chat_answer(port, served)
    finally:
        proc.terminate()
        proc.wait()


def compare(ref, alt):
    """Mean and largest change of a token's log-prob, and how many positions'
    most likely next token differs, of `alt` against `ref`."""
    deltas, differ = [], 0
    for a, b in zip(ref, alt):
        if [t for t, _, _ in a] != [t for t, _, _ in b]:
            sys.exit("activations.py: two runs tokenized a chunk differently")
        for (_, la, ta), (_, lb, tb) in zip(a, b):
            deltas.append(abs(la - lb))
            differ += ta != tb
    return statistics.mean(deltas), max(deltas), differ, len(deltas)


def perplexity(rows):
    lps = [lp for piece in rows for _, lp, _ in piece]
    return math.exp(-sum(lps) / len(lps))


def accuracy(kiln, args):
    text = Path(args.text).read_text(encoding="utf-8")
    pieces = chunks(text, args.chunk_chars)
    got, answers = {}, {}
    for s in SETTINGS:
        got[f"activations {s}"], answers[f"activations {s}"] = score(kiln, s, pieces, args.port, args.threads)
    made = None if args.reference else make_reference(args)
    reference = args.reference or made
    if reference:
        base_name = "f32 weights"
        got[base_name], answers[base_name] = score(kiln, "int16", pieces, args.port, args.threads, reference)
    else:
        base_name = "activations int16"
    base = got[base_name]
    total = sum(len(p) for p in base)
    print(f"### Accuracy: the default model on {args.text} ({len(pieces)} chunks, {total} scored tokens)")
    print()
    if reference:
        print(f"The reference is {reference}: the same weights dequantized to F32, whose")
        print("products run in f32 with unquantized activations.")
        print()
    print(f"| run | perplexity | mean abs. change of a token's log-prob vs {base_name} | largest "
          f"| most likely next token differs | greedy answer to \"{QUESTION}\" |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    print(f"| {base_name} | {perplexity(base):.4f} | | | | {answers[base_name]!r} |")
    for name, rows in got.items():
        if name == base_name:
            continue
        mean, top, differ, n = compare(base, rows)
        print(f"| {name} | {perplexity(rows):.4f} | {mean:.4f} | {top:.4f} "
              f"| {differ} of {n} ({100 * differ / n:.2f}%) | {answers[name]!r} |")
    server = PEERS / "llama-server"
    if DEFAULT_GGUF.exists() and server.exists():
        print(f"| llama.cpp (llama-server, same file) | | | | | "
              f"{llama_answer(str(server), str(DEFAULT_GGUF), args.port, args.threads)!r} |")
    print()
    if made:
        shutil.rmtree(Path(made).parent, ignore_errors=True)


def make_reference(args):
    """The default model dequantized to F32 by llama-quantize, where the peers
    are built (scripts/bench/peers.sh); None otherwise."""
    quantize = PEERS / "llama-quantize"
    if not (quantize.exists() and DEFAULT_GGUF.exists()):
        return None
    out = Path(tempfile.mkdtemp(prefix="kiln-activations.")) / "smollm2-f32.gguf"
    r = subprocess.run([str(quantize), "--allow-requantize", str(DEFAULT_GGUF), str(out), "F32"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"activations.py: llama-quantize failed: {r.stderr[-2000:]}")
    return str(out)


def speed(kiln, args):
    results = {}
    for r in range(args.rounds):
        for f in args.gguf:
            order = SETTINGS if r % 2 == 0 else SETTINGS[::-1]
            for s in order:
                env = dict(os.environ, KILN_CPU_ACTIVATIONS=s)
                out = subprocess.run(
                    [kiln, "bench", "--threads", str(args.threads), "--model", f,
                     "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens),
                     "--repeats", "1", "--concurrency", "0", "--max-model-len", "4096", "--json"],
                    env=env, capture_output=True, text=True)
                if out.returncode != 0:
                    sys.exit(f"activations.py: kiln bench failed on {f} ({s}): {out.stderr[-2000:]}")
                j = json.loads(out.stdout)
                results.setdefault((f, s), []).append((j["prompt_tok_s"], j["decode_tok_s"]))
    pp_n, tg_n = args.prompt_tokens, args.gen_tokens
    print(f"### Speed: {args.threads} threads, pp{pp_n} tg{tg_n}, {args.rounds} rounds (medians; every run listed)")
    print()
    print(f"| file | pp{pp_n} int16 | pp{pp_n} int8 | ratio | tg{tg_n} int16 | tg{tg_n} int8 | ratio |")
    print("| --- | --- | --- | ---: | --- | --- | ---: |")
    for f in args.gguf:
        a, b = results[(f, "int16")], results[(f, "int8")]
        med = lambda v, k: statistics.median(x[k] for x in v)  # noqa: E731
        runs = lambda v, k: ", ".join(f"{x[k]:.1f}" for x in v)  # noqa: E731
        print(f"| {Path(f).stem} | {med(a, 0):.1f} ({runs(a, 0)}) | {med(b, 0):.1f} ({runs(b, 0)}) "
              f"| {med(b, 0) / med(a, 0):.2f} | {med(a, 1):.2f} ({runs(a, 1)}) | {med(b, 1):.2f} ({runs(b, 1)}) "
              f"| {med(b, 1) / med(a, 1):.2f} |")
    print()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--chunk-chars", type=int, default=2000)
    ap.add_argument("--reference", help="the default model's weights as an F32 GGUF "
                    "(default: made with llama-quantize where it is built)")
    ap.add_argument("--port", type=int, default=18231)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("gguf", nargs="*")
    args = ap.parse_args()
    kiln = kiln_binary()
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((l.split(":", 1)[1].strip() for l in cpu.splitlines() if l.startswith("Model name")), "?")
    amx = "amx_tile" in cpu
    print(f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; cpu: {name}, "
          f"{os.cpu_count()} cores, AMX {'present' if amx else 'absent'}; kiln: {kiln}")
    print()
    accuracy(kiln, args)
    if args.gguf:
        speed(kiln, args)


if __name__ == "__main__":
    main()
