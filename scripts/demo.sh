#!/usr/bin/env bash
# The main job, end to end on a fresh machine (CPU only, about 12–14 minutes on a 2-core machine):
#   1. set up the venv, the package and Fashion-MNIST;
#   2. train DS-Net-T* (dsnet_tiny) on the 60,000 Fashion-MNIST training images (configs/fashion_mnist/dsnet_tiny.yaml);
#   3. evaluate it on the 10,000 test images (top-1, top-5, per-class accuracy, confusion matrix);
#   4. write a few test images as PNG files into the run folder and predict them with `dsnet predict`;
#   5. draw the paper's Figure 1 for four of them (streams.png: attention of a point, local/global/fused features).
# Extra arguments go to `dsnet train`, e.g.  bash scripts/demo.sh --set sched.epochs=1
# Torch threads default to the CPU cores not already busy (load average); force them with --set train.threads=N
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --with-data

PY=.venv/bin/python
DSNET=.venv/bin/dsnet
OUT=${DSNET_RUNS:-runs}
START=$(date +%s)

echo "== train dsnet_tiny on Fashion-MNIST (CPU) =="
$DSNET train -c configs/fashion_mnist/dsnet_tiny.yaml --set train.output_dir="$OUT" --set train.name=demo "$@"
RUN=$(ls -td "$OUT"/demo-* | head -n 1)

echo "== the trained model on the 10,000 test images (the run's final evaluation) =="
# training validated on the test split after its last epoch and saved that evaluation in summary.json, so it is not
# repeated here (`dsnet eval "$RUN" --tag last` recomputes it, as for any checkpoint)
$PY - "$RUN/summary.json" <<'EOF'
import json, sys

final = json.load(open(sys.argv[1]))["final"]
print(f"top-1 {final['top1']:.2f}%  top-5 {final['top5']:.2f}%  on {final['num_samples']:,} images; per class:")
for name, acc in final["per_class"].items():
    print(f"  {name:<12} {'n/a' if acc is None else f'{acc:6.2f}%'}")
EOF

echo "== predict a few test images =="
mkdir -p "$RUN/samples"
$PY - "$RUN/samples" <<'EOF'
import sys
from PIL import Image
from dsnet.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist

images, labels = load_fashion_mnist("test")
for i in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11):
    name = FASHION_MNIST_CLASSES[labels[i]].replace("/", "-").replace(" ", "_")
    Image.fromarray(images[i]).save(f"{sys.argv[1]}/test{i:05d}_{name}.png")
EOF
$DSNET predict "$RUN" "$RUN/samples" --top-k 3 --json > "$RUN/samples/predictions.json"
$PY - "$RUN/samples/predictions.json" <<'EOF'
import json, sys
from pathlib import Path

rows = json.loads(Path(sys.argv[1]).read_text())
hits = 0
print(f"{'file':<28} {'true':<12} {'predicted (top-3, probability)'}")
for r in rows:
    true = Path(r["path"]).stem.split("_", 1)[1].replace("_", " ").replace("T-shirt-top", "T-shirt/top")
    hits += r["labels"][0] == true
    top = ", ".join(f"{label} {p * 100:.0f}%" for label, p in zip(r["labels"], r["probs"]))
    print(f"{Path(r['path']).name:<28} {true:<12} {'ok ' if r['labels'][0] == true else 'XX '}{top}")
print(f"{hits}/{len(rows)} sample images predicted correctly")
EOF

echo "== see the two streams: the DS-Net paper's Figure 1 for four test images =="
# block 1.2: the last block of stage 1, local 8x8 / global 4x4 at 32 px (later stages have 2x2 and 1x1 grids)
if $DSNET viz streams "$RUN" "$RUN"/samples/test0000{0,1,4,8}_*.png --block 1.2 --out "$RUN/streams.png" >/dev/null; then
  echo "attention and stream features: $RUN/streams.png"
else
  echo "(dsnet viz streams needs a DS-Net, TransXNet or MixFormer model; skipped)"
fi

RESULT=$($PY -c "import json,sys; r=json.load(open(sys.argv[1]))['final']; print(f\"{r['top1']:.2f}% on {r['num_samples']:,}\")" "$RUN/summary.json")
echo
echo "test top-1: ${RESULT} Fashion-MNIST test images"
echo "run folder: $RUN  (config.yaml, summary.json, metrics.jsonl, curves.png, confusion.png, streams.png, samples/, checkpoints/)"
echo "wall clock: $(( ($(date +%s) - START) / 60 )) min $(( ($(date +%s) - START) % 60 )) s (training + evaluation + prediction)"
