#!/usr/bin/env python3
"""Load benchmark for a running `kiln serve` (Python standard library only).

    kiln serve --port 8080 &
    python3 scripts/bench/load.py --url http://127.0.0.1:8080 --concurrency 1,8,32

For each concurrency level C, C client threads each send streaming requests
one after another (a closed loop) until the level's request count is done.
Every request has a prompt of exactly --prompt-tokens tokens (random common
words, so no two requests share a cached prefix) and asks for exactly
--output-tokens tokens (`ignore_eos`), so every level does the same work
per request. Requests go to the DJL route `/predictions/{model}` with
`"stream": true` (JSON lines, one per token), or with --api openai to
`/v1/completions` with `"stream": true` (server-sent events).

Reported per level: requests/s and output tokens/s (all requests over the
wall time from the first request sent to the last one finished), time to
first token (request sent to first token line received) and inter-token
latency (gap between consecutive token lines of a request), median and p90.
--json prints the same as JSON.
"""

import argparse
import http.client
import json
import random
import statistics
import sys
import threading
import time
import urllib.parse

# Common English words; each is one token with its leading space in the
# GPT-2-style BPE vocabularies (checked against the server at start).
WORDS = (
    "the of and to in is was for on are with as his they be at one have this from or had by "
    "but some what there we can out other were all your when up use word how said an each she "
    "which do their time if will way about many then them would write like so these her long "
    "make thing see him two has look more day could go come did my sound no most number who "
    "over know water than call first people may down side been now find any new work part take "
    "get place made live where after back little only round man year came show every good me "
    "give our under name very through just form much great think say help low line before turn "
    "cause same mean differ move right boy old too does tell sentence set three want air well "
    "also play small end put home read hand port large spell add even land here must big high "
    "such follow act why ask men change went light kind off need house picture try us again "
    "animal point mother world near build self earth father head stand own page should country"
).split()


def percentile(xs, q):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class Client:
    def __init__(self, url, api_key):
        u = urllib.parse.urlparse(url)
        self.host, self.port = u.hostname, u.port or 80
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def conn(self):
        return http.client.HTTPConnection(self.host, self.port, timeout=600)

    def post(self, path, body):
        c = self.conn()
        c.request("POST", path, json.dumps(body), self.headers)
        r = c.getresponse()
        data = r.read()
        c.close()
        if r.status != 200:
            raise RuntimeError(f"POST {path}: {r.status} {data[:300]!r}")
        return json.loads(data)

    def stream(self, path, body, sse):
        """Sends a streaming request; returns (t_sent, [token arrival times])."""
        c = self.conn()
        t0 = time.perf_counter()
        c.request("POST", path, json.dumps(body), self.headers)
        r = c.getresponse()
        if r.status != 200:
            raise RuntimeError(f"POST {path}: {r.status} {r.read()[:300]!r}")
        times = []
        while True:
            line = r.readline()
            if not line:
                break
            now = time.perf_counter()
            line = line.strip()
            if not line:
                continue
            if sse:
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                v = json.loads(data)
                ch = v.get("choices") or []
                if ch and ch[0].get("finish_reason") is None:
                    times.append(now)
            else:
                v = json.loads(line)
                if "token" in v:
                    times.append(now)
                if "error" in v:
                    raise RuntimeError(f"stream error: {v}")
        c.close()
        return t0, times


def make_prompt(rng, n):
    # The first word has no leading space; the rest do.
    return " ".join(rng.choice(WORDS) for _ in range(n))


def prompt_len(client, model, prompt):
    v = client.post(
        "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0}
    )
    return v["usage"]["prompt_tokens"]


def run_level(client, args, conc, n_requests, rng_seed):
    rng = random.Random(rng_seed)
    prompts = [make_prompt(rng, args.prompt_tokens) for _ in range(n_requests)]
    sse = args.api == "openai"
    if sse:
        path = "/v1/completions"
        body = lambda p: {  # noqa: E731
            "model": args.model,
            "prompt": p,
            "max_tokens": args.output_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
    else:
        path = f"/predictions/{args.model}"
        body = lambda p: {  # noqa: E731
            "inputs": p,
            "stream": True,
            "parameters": {"max_new_tokens": args.output_tokens, "ignore_eos": True},
        }
    lock = threading.Lock()
    next_i = [0]
    results, errors = [], []

    def worker():
        while True:
            with lock:
                i = next_i[0]
                if i >= n_requests:
                    return
                next_i[0] += 1
            try:
                t0, times = client.stream(path, body(prompts[i]), sse)
                t1 = time.perf_counter()
                with lock:
                    results.append((t0, times, t1))
            except Exception as e:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(str(e))

    threads = [threading.Thread(target=worker) for _ in range(conc)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    ttft, itl, out_tokens = [], [], 0
    for t0, times, _ in results:
        if len(times) != args.output_tokens:
            raise RuntimeError(f"a request streamed {len(times)} tokens, not {args.output_tokens}")
        out_tokens += len(times)
        ttft.append(times[0] - t0)
        itl.extend(b - a for a, b in zip(times, times[1:]))
    return {
        "concurrency": conc,
        "requests": len(results),
        "wall_s": wall,
        "requests_per_s": len(results) / wall,
        "output_tokens_per_s": out_tokens / wall,
        "ttft_median_s": statistics.median(ttft),
        "ttft_p90_s": percentile(ttft, 0.9),
        "itl_median_s": statistics.median(itl) if itl else float("nan"),
        "itl_p90_s": percentile(itl, 0.9),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--model", default="default")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--api", choices=["lmi", "openai"], default="lmi")
    ap.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    ap.add_argument("--requests", type=int, default=0,
                    help="requests per level (default: 2 x concurrency, at least 8)")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=None,
                    help="prompt seed (default: from the clock, so a rerun against the same server "
                         "finds nothing in its prefix cache)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.seed is None:
        args.seed = time.time_ns() % 1_000_000_007
    client = Client(args.url, args.api_key)

    # The prompts must be exactly --prompt-tokens long: check a few.
    rng = random.Random(args.seed ^ 0x5EED)
    for _ in range(3):
        p = make_prompt(rng, args.prompt_tokens)
        n = prompt_len(client, args.model, p)
        if n != args.prompt_tokens:
            sys.exit(f"a {args.prompt_tokens}-word prompt is {n} tokens for this model's tokenizer: "
                     "the word list does not fit it")
    # Warm-up (first-touch of weights and KV cache pages).
    client.stream(f"/predictions/{args.model}",
                  {"inputs": "Hello", "stream": True, "parameters": {"max_new_tokens": 4}}, False)

    rows = []
    for i, conc in enumerate(int(c) for c in args.concurrency.split(",")):
        n = args.requests or max(8, 2 * conc)
        row = run_level(client, args, conc, n, args.seed + i)
        rows.append(row)
        if not args.json:
            print(f"concurrency {conc}: {row['requests']} requests in {row['wall_s']:.1f} s", file=sys.stderr)
    if args.json:
        print(json.dumps({"prompt_tokens": args.prompt_tokens, "output_tokens": args.output_tokens,
                          "api": args.api, "seed": args.seed, "levels": rows}, indent=2))
        return
    print(f"\n{args.prompt_tokens}-token prompts, {args.output_tokens} output tokens each "
          f"(ignore_eos), streamed via {'/v1/completions' if args.api == 'openai' else '/predictions'}, "
          f"seed {args.seed}\n")
    print("| concurrent clients | requests | requests/s | output tokens/s | TTFT median | TTFT p90 "
          "| inter-token median | inter-token p90 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests']} | {r['requests_per_s']:.2f} | "
              f"{r['output_tokens_per_s']:.0f} | {r['ttft_median_s'] * 1e3:.0f} ms | "
              f"{r['ttft_p90_s'] * 1e3:.0f} ms | {r['itl_median_s'] * 1e3:.1f} ms | "
              f"{r['itl_p90_s'] * 1e3:.1f} ms |")


if __name__ == "__main__":
    main()
