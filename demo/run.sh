#!/usr/bin/env bash
# End-to-end demo on the bundled photos with the bundled default model. `make demo` runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
SA=".venv/bin/sa-engine"
OUT="demo/out"
rm -rf "$OUT"; mkdir -p "$OUT"
$SA --help

# The bundled default model (round 0, engine/weights/): one click on the cat, no checkpoint path.
$SA predict demo/photos/chelsea.jpg --model default --point 190,180 --multimask --out "$OUT/predict"
echo "demo: bundled-model masks and overlay in $OUT/predict/"
