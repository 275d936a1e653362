#!/usr/bin/env bash
# Sets up a fresh machine to run kiln: downloads the default model into the
# cache (outside the repository) and installs the `kiln` binary into
# ~/.cargo/bin (release build).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-assets.sh >/dev/null
cargo install --locked --path crates/kiln
