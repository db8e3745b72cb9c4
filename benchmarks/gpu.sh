#!/usr/bin/env bash
# On a CUDA machine: iterations per second of the quick and paper presets (gdfq, adadfq, hast, akt, synq) and of
# ResNet-18/50 and MobileNetV2 at 224×224 (benchmarks/arch_speed.py, batch 64), then one
# full paper-budget W4A4 AKT run on Fashion-MNIST (AdaDFQ data, AdaDFQ's loss under RFD). Writes OUT/gpu.json.
#   bash benchmarks/gpu.sh [OUT]          (OUT defaults to runs/gpu; rerun the same command to resume the long run)
# SPEED_ONLY=1 skips the long run (a lent GPU with minutes, not hours, to spare). On a machine whose torch is not
# our pin (the lent H100 had 2.11), run from the checkout without installing: PYTHONPATH=src bash benchmarks/gpu.sh
set -euo pipefail
out=${1:-runs/gpu}
py=${PYTHON:-python3}
mkdir -p "$out"
$py -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh needs a CUDA device')"
$py benchmarks/preset_speed.py --device cuda --iters "${ITERS:-100}" | tee "$out/speed.log"
$py benchmarks/arch_speed.py --device cuda --batch-size "${ARCH_BATCH:-64}" | tee "$out/arch_speed.log"
if [ -z "${SPEED_ONLY:-}" ] && [ ! -f "$out/paper-akt-w4/result.json" ]; then
  resume=$([ -f "$out/paper-akt-w4/state.pt" ] && echo --resume || true)
  $py -m zsq quantize --teacher resnet20_fmnist --wbits 4 --abits 4 --source adadfq --loss akt --akt-base gap-entropy \
    --preset paper --device cuda --seed 0 --quiet --out "$out/paper-akt-w4" $resume
fi
$py - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
speed = json.loads((out / "speed.log").read_text().strip().splitlines()[-1])
arch = json.loads((out / "arch_speed.log").read_text().strip().splitlines()[-1])
path = out / "paper-akt-w4" / "result.json"
run = {k: v for k, v in json.loads(path.read_text()).items() if k != "act_ranges"} if path.exists() else None
(out / "gpu.json").write_text(json.dumps({"speed": speed, "arch_speed": arch, "paper_akt_w4a4": run}, indent=2) + "\n")
print(json.dumps({"device": speed["device"], "speed": speed["figures"],
                  "paper_akt_w4a4_q_top1": run["q_top1"] if run else None}))
PY
