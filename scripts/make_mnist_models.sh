#!/usr/bin/env bash
# The MNIST demo models, from the repository root (docs/mnist.md says what they are):
#   models/mnist           a standard mnist_cnn trained with Gaussian noise at σ = 0.25 (the demo model)
#   models/mnist-selector  a σ selector over Σ = {0.25, 0.5, 1.0}: an estimator smoothed at σ_e = 1.0,
#                          started from the σ = 1.0 expert's weights, and one expert per level (the
#                          σ = 0.25 expert is models/mnist); its settings were chosen on test images
#                          apart from the evaluated ones (EVALUATION.md, "Choosing Σ and the settings")
#   examples/mnist-<class>.png  the first test-split image of each class
# The experts at 0.5 and 1.0 are written to $WORK (default build/mnist), not kept in the repository:
# the selector bundle holds copies of all three.
set -euo pipefail
SC=${SC:-.venv/bin/smoothcert}
WORK=${WORK:-build/mnist}
COMMON=(--method gaussian --arch mnist_cnn --data mnist-5k --epochs 30 --lr 0.003 --normalize auto --seed 0)
"$SC" train "${COMMON[@]}" --sigma 0.25 --sigma-min 0.12 --sigma-max 1.0 --name mnist --out models/mnist
for s in 0.5 1.0; do
  "$SC" train "${COMMON[@]}" --sigma "$s" --name "mnist-$s" --out "$WORK/expert-$s"
done
# One thread: the estimator's weights (and so the bundle's digest) depend on the thread count in
# their last bits, and the evaluated bundle was trained with one.
OMP_NUM_THREADS=1 "$SC" train --method selector --experts models/mnist "$WORK/expert-0.5" "$WORK/expert-1.0" \
  --sigmas 0.25 0.5 1.0 --sigma 1.0 --init "$WORK/expert-1.0" --temperature 0.3 --consistency 5 --no-reweight \
  --arch mnist_cnn --data mnist-5k --epochs 30 --lr 0.003 --seed 0 --name mnist-selector --out models/mnist-selector
.venv/bin/python - <<'PY'
from pathlib import Path

from smoothcert.data import load_data
from smoothcert.imageio import encode_png

test = load_data("mnist-5k", "test")
for label in range(10):
    first = int((test.y == label).nonzero()[0][0])
    Path(f"examples/mnist-{label}.png").write_bytes(encode_png(test.x[first]))
print("examples/mnist-0.png … mnist-9.png written")
PY
