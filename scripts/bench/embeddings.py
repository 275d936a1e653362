#!/usr/bin/env python3
"""Embedding throughput: kiln's /v1/embeddings against sentence-transformers
`encode` (and llama-server --embeddings where llama.cpp's converter takes the
file) on random-weight BERT checkpoints at real shapes. Run by
scripts/bench/embeddings.sh, which documents the knobs.

  minilm  all-MiniLM-L6-v2 shape: hidden 384, 6 layers, 12 heads, ff 1536
  base    bge-base / e5-base shape: hidden 768, 12 layers, 12 heads, ff 3072
  both    vocab 30522, 512 positions, mean pooling + Normalize

For each model, sequence length (16, 256 tokens with [CLS]/[SEP]) and batch
(1: 32 requests of one input; 32: one request of 32 inputs) it times 32
inputs, kiln, sentence-transformers and llama-server taking turns in every
round, and prints a Markdown table of medians (inputs per second).
"""
import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                   intermediate_size=1536),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072),
}
VOCAB = 30522
N_INPUTS = 32
LENGTHS = [16, 256]
BATCHES = [1, 32]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def words():
    return [f"w{i}" for i in range(VOCAB - len(SPECIALS))]


def write_model(name, out: Path):
    """A random-weight BertModel of shape `name` with a WordPiece tokenizer
    whose words w0, w1, ... are one token each, as sentence-transformers saves it."""
    import torch
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast
    from sentence_transformers import SentenceTransformer, models as st_models
    if (out / "modules.json").exists():
        return
    vocab = {t: i for i, t in enumerate(SPECIALS + words())}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, max_position_embeddings=512, type_vocab_size=2,
                     **SHAPES[name])
    model = BertModel(cfg, add_pooling_layer=False).eval()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        fast.save_pretrained(tmp)
        # BERT's WordPiece vocab.txt, which llama.cpp's converter reads.
        (Path(tmp) / "vocab.txt").write_text("\n".join(SPECIALS + words()) + "\n")
        word = st_models.Transformer(tmp, max_seq_length=512)
        pool = st_models.Pooling(word.get_embedding_dimension(), pooling_mode="mean")
        SentenceTransformer(modules=[word, pool, st_models.Normalize()], device="cpu").save(str(out))
        shutil.copy(Path(tmp) / "vocab.txt", out / "vocab.txt")


def texts(length):
    """N_INPUTS distinct texts of `length` tokens ([CLS] and [SEP] included)."""
    w = words()
    return [" ".join(w[(i * 7919 + j * 31) % len(w)] for j in range(length - 2))
            for i in range(N_INPUTS)]


def post(port, path, body):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    c.close()
    if r.status != 200:
        raise RuntimeError(f"{path} on :{port}: {r.status} {data[:300]!r}")
    return json.loads(data)


def wait_http(port, proc, what, limit=300):
    t0 = time.time()
    while time.time() - t0 < limit:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            ok = c.getresponse().status == 200
            c.close()
            if ok:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not start in {limit} s")


def http_runner(port, model, check_tokens=None):
    def run(batch, inputs):
        for i in range(0, len(inputs), batch):
            v = post(port, "/v1/embeddings", {"model": model, "input": inputs[i:i + batch]})
            if check_tokens is not None:
                assert len(v["data"]) == len(inputs[i:i + batch])
                assert v["usage"]["prompt_tokens"] == check_tokens * len(inputs[i:i + batch]), v["usage"]
    return run


def st_runner(model):
    def run(batch, inputs):
        model.encode(inputs, batch_size=batch, convert_to_numpy=True)
    return run


# llama.cpp's converter identifies a tokenizer by hashing how it splits a
# test text and refuses one it has not seen (this script's synthetic
# WordPiece vocabulary); for a BERT tokenizer the pre-tokenizer name is not
# used by llama.cpp, so the run below names it "default".
CONVERT = """
import runpy, sys
src, conv = sys.argv[1], sys.argv[2]
sys.argv = [conv] + sys.argv[3:]
sys.path.insert(0, src)
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
runpy.run_path(conv, run_name="__main__")
"""


def gguf_of(model_dir: Path, out: Path, llama_src: Path, py):
    """llama.cpp's converter on the checkpoint (f32); None with the reason if it refuses."""
    if out.exists():
        return out, None
    conv = llama_src / "convert_hf_to_gguf.py"
    if not conv.exists():
        return None, f"no {conv}"
    r = subprocess.run([py, "-c", CONVERT, str(llama_src), str(conv), str(model_dir),
                        "--outtype", "f32", "--outfile", str(out)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        last = [l for l in (r.stderr or r.stdout).strip().splitlines() if l.strip()]
        return None, "converter refused: " + (last[-1] if last else f"exit {r.returncode}")
    return out, None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--llama-bin", default="")
    ap.add_argument("--llama-src", default="")
    ap.add_argument("--models", default="minilm,base")
    a = ap.parse_args()
    import torch
    from sentence_transformers import SentenceTransformer
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    names = [n for n in a.models.split(",") if n]
    dirs = {}
    for n in names:
        dirs[n] = out / "models" / n
        write_model(n, dirs[n])
    port = 18431
    env = dict(os.environ, KILN_THREADS=str(a.threads), RAYON_NUM_THREADS=str(a.threads))
    spec = ",".join(f"{n}={dirs[n]}" for n in names)
    klog = open(out / "kiln.log", "w")
    kiln = subprocess.Popen([a.kiln, "serve", "--models", spec, "--port", str(port),
                             "--max-request-bytes", str(64 << 20)],
                            stdout=klog, stderr=subprocess.STDOUT, env=env)
    servers = [kiln]
    llama = {}
    notes = []
    try:
        wait_http(port, kiln, "kiln")
        st = {n: SentenceTransformer(str(dirs[n]), device="cpu") for n in names}
        rows = []
        for i, n in enumerate(names):
            # One llama-server at a time (its idle threads must not take the
            # cores from the others).
            if a.llama_bin:
                g, why = gguf_of(dirs[n], out / f"{n}-f32.gguf", Path(a.llama_src), sys.executable)
                if g is None:
                    notes.append(f"llama-server {n}: {why}")
                else:
                    p = port + 1 + i
                    log = open(out / f"llama-{n}.log", "w")
                    proc = subprocess.Popen(
                        [str(Path(a.llama_bin) / "llama-server"), "-m", str(g), "--embeddings",
                         "--pooling", "mean", "-t", str(a.threads), "-tb", str(a.threads),
                         "--poll", "0", "-c", str(N_INPUTS * 512), "-np", str(N_INPUTS),
                         "-b", "8192", "-ub", "8192", "--port", str(p)],
                        stdout=log, stderr=subprocess.STDOUT)
                    servers.append(proc)
                    try:
                        wait_http(p, proc, f"llama-server {n}")
                        llama[n] = p
                    except RuntimeError as e:
                        notes.append(f"llama-server {n}: {e}")
            for length in LENGTHS:
                inputs = texts(length)
                peers = {"kiln": http_runner(port, n, check_tokens=length),
                         "sentence-transformers": st_runner(st[n])}
                if n in llama:
                    peers["llama-server"] = http_runner(llama[n], n)
                for batch in BATCHES:
                    times = {k: [] for k in peers}
                    for k, run in peers.items():
                        run(batch, inputs[:batch])  # warm-up
                    for _ in range(a.rounds):
                        for k, run in peers.items():
                            t0 = time.perf_counter()
                            run(batch, inputs)
                            times[k].append(time.perf_counter() - t0)
                    med = {k: statistics.median(v) for k, v in times.items()}
                    rows.append((n, length, batch, {k: N_INPUTS / t for k, t in med.items()}))
                    print(f"{n} len {length} batch {batch}: " +
                          ", ".join(f"{k} {N_INPUTS / t:.1f}/s" for k, t in med.items()), file=sys.stderr)
            if n in llama:
                servers[-1].terminate()
                servers[-1].wait(timeout=30)
        cols = ["kiln", "sentence-transformers", "llama-server"]
        print("| model | tokens/input | batch | " + " | ".join(c + " (inputs/s)" for c in cols) +
              " | kiln / sentence-transformers |")
        print("|---|---:|---:|" + "---:|" * (len(cols) + 1))
        for n, length, batch, r in rows:
            cells = [f"{r[c]:.1f}" if c in r else "-" for c in cols]
            ratio = r["kiln"] / r["sentence-transformers"]
            print(f"| {n} | {length} | {batch} | " + " | ".join(cells) + f" | {ratio:.2f} |")
        for note in notes:
            print(f"\n- {note}")
    finally:
        for p in servers:
            p.terminate()
        for p in servers:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
