#!/usr/bin/env bash
# End-to-end demo on the bundled photos with the bundled default model. `make demo` runs it.
# ingest -> privacy -> gear 3 (automatic) + quality report -> release export + verify -> gear 1
# (simulated annotator) -> effort report -> one click. Retraining: see the README (train/evaluate). Small settings so it finishes in minutes on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
SA=".venv/bin/sa-engine"
OUT="demo/out"
STORE="$OUT/store"
rm -rf "$OUT"; mkdir -p "$OUT"
# CPU-sized gear 3: a 12x12 grid, no crops, looser thresholds for the small bundled model.
AUTO=(--config sa1b --set amg.points_per_side=12 --set amg.crop_n_layers=0
      --set amg.pred_iou_thresh=0.5 --set amg.stability_score_thresh=0.7)

echo "== 1. ingest the bundled photos into shards"
$SA ingest demo/photos --store "$STORE" --shard-size 2

echo "== 2. privacy: blur faces and plates (embedded local Ray)"
$SA run privacy "$STORE"

echo "== 3. gear 3: automatic masks with the bundled model (round 0)"
$SA run auto "$STORE" --model default "${AUTO[@]}"
$SA status "$STORE"
$SA quality "$STORE" --out "$OUT/quality"

echo "== 4. release: SA-1B tars (blurred images only) + checksums, verified; COCO JSON"
$SA export sa1b "$STORE" --out "$OUT/release"
$SA verify "$OUT/release"
$SA export coco "$STORE" --out "$OUT/auto_coco.json"

echo "== 5. gear 1: the simulated annotator clicks the gear-3 masks as references"
# references are matched to store images by file name: name them after the ingested photos
.venv/bin/python - "$STORE" "$OUT/auto_coco.json" <<'PY'
import json, sys
from pathlib import Path
from sharding import Store
manifest = Store(sys.argv[1]).manifest()
names = {i: Path(s).name for i, s in zip(manifest.column("image_id").to_pylist(), manifest.column("source").to_pylist())}
coco = json.loads(Path(sys.argv[2]).read_text())
for image in coco["images"]:
    image["file_name"] = names[image["id"]]
Path(sys.argv[2]).write_text(json.dumps(coco))
PY
$SA run assisted "$STORE" --annotator simulated --references "$OUT/auto_coco.json" \
    --model default --set annotate.max_clicks=5
$SA report "$STORE" --out "$OUT/report"

echo "== 6. one click on the cat with the bundled model"
$SA predict demo/photos/chelsea.jpg --model default --point 170,110 --multimask --out "$OUT/predict"

echo "demo done: release in $OUT/release, quality and effort reports in $OUT/quality and $OUT/report, overlays in $OUT/predict"
