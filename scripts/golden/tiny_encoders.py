#!/usr/bin/env python3
"""Tiny random BERT and XLM-RoBERTa sentence-transformers checkpoints and
their golden embeddings, for kiln's encoder (crates/kiln-model/src/encoder).

Writes testdata/tiny/bert/ and testdata/tiny/xlmr/: the Hugging Face model
(config.json, model.safetensors), a WordPiece tokenizer.json written by hand
(no hub), the sentence-transformers files (modules.json, 1_Pooling/...,
2_Normalize/ where used) as `SentenceTransformer.save` writes them, and
golden.json: for each text its token ids (with special tokens) and the
embedding `SentenceTransformer.encode` gives, one text at a time.

  bert/  BertModel, mean pooling, Normalize; token_type_ids all 0.
  xlmr/  XLMRobertaModel (positions offset by padding_idx 1), CLS pooling,
         no Normalize.
  bert_rerank/  BertForSequenceClassification (1 label): a cross-encoder,
         with transformers logits and CrossEncoder.predict scores per pair.
  xlmr_rerank/  XLMRobertaForSequenceClassification (1 label): a bge-reranker
         style cross-encoder (pairs as <s> A </s></s> B </s>, token types all
         0), with the same goldens as bert_rerank.
  qwen3_embed/  a decoder embedder as Qwen3-Embedding is published: a bare
         Qwen3Model (tensor names without "model.", no lm_head), a byte-level
         BPE tokenizer whose post-processor appends <|endoftext|>, last-token
         pooling, Normalize, and sentence-transformers prompts with
         default_prompt_name "query"; golden per text with the default prompt
         and with prompt_name "document".

Run from the repository root:
  HF_HUB_OFFLINE=1 ~/.cache/kiln/venv-golden/bin/python scripts/golden/tiny_encoders.py
"""
import json
import shutil
import sys
import tempfile
from pathlib import Path

SEED = 24
TEXTS = [
    "kiln",
    "the cat sat on the mat",
    "embeddings for retrieval, fired in a tiny kiln; clay and glaze",
    "UNKNOWN words: qzx!",
]
WORDS = ["the", "cat", "sat", "on", "mat", "kiln", "clay", "glaze", "tiny", "for", "in", "a",
         "emb", "##ed", "##ding", "##s", "retrieval", "fired", "words", "un", "##known"]


def vocab(specials):
    toks = list(specials)
    for c in "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'-":
        toks.append(c)
        toks.append("##" + c)
    for w in WORDS:
        if w not in toks:
            toks.append(w)
    return {t: i for i, t in enumerate(toks)}


def tokenizer(specials, cls, sep, unk, pad):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import AddedToken
    v = vocab(specials)
    tok = Tokenizer(models.WordPiece(v, unk_token=unk, max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=None,
                                                clean_text=True, handle_chinese_chars=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, v[cls]), (sep, v[sep])])
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([AddedToken(s, special=True) for s in specials])
    return tok, v


def randomize(model, seed):
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "LayerNorm.weight" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def build(kind, out: Path):
    import torch
    from transformers import (BertConfig, BertModel, PreTrainedTokenizerFast,
                              XLMRobertaConfig, XLMRobertaModel)
    from sentence_transformers import SentenceTransformer, models as st_models

    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64,
                  hidden_act="gelu", layer_norm_eps=1e-12,
                  attn_implementation="eager")
    if kind == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok, v = tokenizer(specials, "[CLS]", "[SEP]", "[UNK]", "[PAD]")
        cfg = BertConfig(vocab_size=len(v), type_vocab_size=2, pad_token_id=0, **common)
        model = BertModel(cfg, add_pooling_layer=False)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
        pooling, normalize = "mean", True
    else:
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        tok, v = tokenizer(specials, "<s>", "</s>", "<unk>", "<pad>")
        cfg = XLMRobertaConfig(vocab_size=len(v), type_vocab_size=1, pad_token_id=1,
                               bos_token_id=0, eos_token_id=2, **common)
        model = XLMRobertaModel(cfg, add_pooling_layer=False)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                       cls_token="<s>", sep_token="</s>", mask_token="<mask>",
                                       bos_token="<s>", eos_token="</s>")
        pooling, normalize = "cls", False
    randomize(model, SEED + (0 if kind == "bert" else 1))
    model.eval()
    if out.exists():
        shutil.rmtree(out)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        fast.save_pretrained(tmp)
        word = st_models.Transformer(tmp, max_seq_length=64)
        mods = [word, st_models.Pooling(word.get_embedding_dimension(), pooling_mode=pooling)]
        if normalize:
            mods.append(st_models.Normalize())
        st = SentenceTransformer(modules=mods, device="cpu")
        st.save(str(out))
    # The generated model card is prose with no bearing on the goldens.
    (out / "README.md").unlink(missing_ok=True)
    st = SentenceTransformer(str(out), device="cpu")
    golden = {"pooling": pooling, "normalize": normalize, "texts": []}
    for text in TEXTS:
        ids = fast(text)["input_ids"]
        emb = st.encode([text], convert_to_numpy=True, batch_size=1)[0]
        golden["texts"].append({"text": text, "ids": ids, "embedding": [float(x) for x in emb]})
    batch = st.encode(TEXTS, convert_to_numpy=True, batch_size=len(TEXTS))
    golden["batch_max_abs_diff_vs_single"] = float(max(
        abs(float(a) - b) for row, t in zip(batch, golden["texts"]) for a, b in zip(row, t["embedding"])))
    import sentence_transformers, transformers
    golden["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                          "sentence_transformers": sentence_transformers.__version__}
    (out / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")
    print(kind, "->", out, "dim", len(golden["texts"][0]["embedding"]))


RERANK_QUERY = "the cat"
RERANK_DOCS = ["the cat sat on the mat", "kiln", "clay and glaze fired in a tiny kiln"]


def build_rerank(out: Path, kind="bert"):
    """A sequence-classification cross-encoder (one label): BERT
    (BertForSequenceClassification: pooler + classifier) or XLM-RoBERTa
    (XLMRobertaForSequenceClassification: classifier.dense + tanh +
    out_proj on <s>, as bge-reranker) and, per (query, document) pair, its
    ids, token types, the transformers logit and sentence-transformers'
    CrossEncoder.predict score (sigmoid of the logit)."""
    import torch
    from tokenizers import processors
    from transformers import (BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast,
                              XLMRobertaConfig, XLMRobertaForSequenceClassification)
    from sentence_transformers import CrossEncoder
    shape = dict(num_labels=1, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=64, attn_implementation="eager")
    if kind == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok, v = tokenizer(specials, "[CLS]", "[SEP]", "[UNK]", "[PAD]")
        cfg = BertConfig(vocab_size=len(v), type_vocab_size=2, pad_token_id=0, **shape)
        model = BertForSequenceClassification(cfg)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                       model_input_names=["input_ids", "token_type_ids", "attention_mask"])
        seed = 99
    else:
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        tok, v = tokenizer(specials, "<s>", "</s>", "<unk>", "<pad>")
        # XLM-R's pair form: <s> A </s></s> B </s>, every token type 0.
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
            special_tokens=[("<s>", v["<s>"]), ("</s>", v["</s>"])])
        cfg = XLMRobertaConfig(vocab_size=len(v), type_vocab_size=1, pad_token_id=1,
                               bos_token_id=0, eos_token_id=2, **shape)
        model = XLMRobertaForSequenceClassification(cfg)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                       cls_token="<s>", sep_token="</s>", mask_token="<mask>",
                                       bos_token="<s>", eos_token="</s>",
                                       model_input_names=["input_ids", "attention_mask"])
        seed = 98
    randomize(model, seed)
    model.eval()
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    ce = CrossEncoder(str(out), device="cpu")
    pairs = []
    for d in RERANK_DOCS:
        enc = fast(RERANK_QUERY, d, return_token_type_ids=True)
        args = {"input_ids": torch.tensor([enc["input_ids"]])}
        if kind == "bert":
            args["token_type_ids"] = torch.tensor([enc["token_type_ids"]])
        with torch.no_grad():
            logit = model(**args).logits[0, 0].item()
        pairs.append({"document": d, "ids": enc["input_ids"], "type_ids": enc["token_type_ids"],
                      "logit": logit})
    scores = ce.predict([(RERANK_QUERY, d) for d in RERANK_DOCS], batch_size=1)
    for p, sc in zip(pairs, scores):
        p["score"] = float(sc)
    batch = ce.predict([(RERANK_QUERY, d) for d in RERANK_DOCS], batch_size=len(RERANK_DOCS))
    golden = {"query": RERANK_QUERY, "pairs": pairs, "activation": str(ce.activation_fn),
              "batch_max_abs_diff_vs_single": float(max(abs(float(a) - p["score"])
                                                        for a, p in zip(batch, pairs)))}
    (out / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")
    print(out.name, "->", out)


QWEN_PROMPTS = {"query": "Instruct: find the kiln\nQuery:", "document": ""}


def build_qwen3_embed(out: Path):
    import torch
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model
    from sentence_transformers import SentenceTransformer, models as st_models
    base = out.parent / "qwen3"
    tok = Tokenizer.from_file(str(base / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", pair="$A <|endoftext|> $B:1 <|endoftext|>:1",
        special_tokens=[("<|endoftext|>", eos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|pad|>", padding_side="left")
    cfg = Qwen3Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1000000.0,
                      tie_word_embeddings=False, eos_token_id=eos, bos_token_id=eos,
                      attn_implementation="eager")
    model = Qwen3Model(cfg)
    g = torch.Generator().manual_seed(SEED + 7)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.eval()
    if out.exists():
        shutil.rmtree(out)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        fast.save_pretrained(tmp)
        word = st_models.Transformer(tmp, max_seq_length=128)
        pool = st_models.Pooling(word.get_embedding_dimension(), pooling_mode="lasttoken")
        st = SentenceTransformer(modules=[word, pool, st_models.Normalize()], device="cpu",
                                 prompts=QWEN_PROMPTS, default_prompt_name="query")
        st.save(str(out))
    (out / "README.md").unlink(missing_ok=True)
    st = SentenceTransformer(str(out), device="cpu")
    golden = {"pooling": "lasttoken", "normalize": True, "eos": eos, "prompts": QWEN_PROMPTS,
              "default_prompt_name": "query", "texts": []}
    for text in TEXTS:
        row = {"text": text}
        for key, name in [("", None), ("document_", "document")]:
            prompt = QWEN_PROMPTS[name or "query"]
            row[key + "ids"] = fast(prompt + text)["input_ids"]
            emb = st.encode([text], prompt_name=name, convert_to_numpy=True, batch_size=1)[0]
            row[key + "embedding"] = [float(x) for x in emb]
        golden["texts"].append(row)
    batch = st.encode(TEXTS, convert_to_numpy=True, batch_size=len(TEXTS))
    golden["batch_max_abs_diff_vs_single"] = float(max(
        abs(float(a) - b) for row, t in zip(batch, golden["texts"]) for a, b in zip(row, t["embedding"])))
    (out / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")
    print("qwen3_embed ->", out, "eos", eos)


def main():
    import torch
    torch.set_num_threads(1)
    root = Path(__file__).resolve().parents[2] / "testdata" / "tiny"
    for kind in ["bert", "xlmr"]:
        build(kind, root / kind)
    build_rerank(root / "bert_rerank")
    build_rerank(root / "xlmr_rerank", kind="xlmr")
    build_qwen3_embed(root / "qwen3_embed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
