#!/usr/bin/env bash
# End-to-end demo on the bundled photos with the bundled default model. `make demo` runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
SA=".venv/bin/sa-engine"
OUT="demo/out"
rm -rf "$OUT"; mkdir -p "$OUT"
$SA --help
