#!/usr/bin/env bash
# GPU benchmarks in one call (one H100; fits the device tool's 10-minute command limit).
#
# 1. Here (with network), once:   bash benchmarks/run_gpu.sh fetch-wheels
#    -> .whl/ (git-ignored): open_clip_torch, webdataset 1.0.2 (+ .whl/ref/webdataset 0.2.86
#       for open_clip_train), braceexpand, ftfy, wcwidth; the GPU image has torch, pandas, PIL.
# 2. Device tool: run(command="bash benchmarks/run_gpu.sh", carry=[".whl"], timeout_s=600)
#    -> $OUT/{train_throughput,batch_memory,data_throughput}.json and $OUT/run_gpu.log
#
# Stages (default "throughput memory"; add "data" if time is left): STAGES="throughput" bash ...
# Sizes can be overridden: BATCH (256), STEPS (30), WORKERS (12), MICRO (512).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ "${1:-}" = "fetch-wheels" ]; then
  PY=${PYTHON:-.venv/bin/python}
  set -e
  mkdir -p .whl/ref
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl \
    open_clip_torch==3.3.0 webdataset==1.0.2 braceexpand ftfy wcwidth
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d .whl/ref webdataset==0.2.86
  ls -l .whl .whl/ref
  exit 0
fi

OUT=${OUT:-runs/benchmarks}
mkdir -p "$OUT"
LOG="$OUT/run_gpu.log"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1
STAGES=${STAGES-throughput memory}
BATCH=${BATCH:-256}
STEPS=${STEPS:-30}
WORKERS=${WORKERS:-12}
MICRO=${MICRO:-512}

if [ -d .whl ]; then
  # Ours: webdataset 1.x + open_clip into /tmp/site. Reference: webdataset 0.2.86 into the side
  # environment benchmarks.openclip_ref uses (pandas comes from the image).
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target .cache/openclip_ref .whl/ref/*.whl || exit 1
  printf 'webdataset==0.2.86\npandas\n' > .cache/openclip_ref/.installed
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$PY" -c "import train.core.compat; train.core.compat.ensure_torchvision(); import torch, open_clip, webdataset; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'open_clip', open_clip.__version__, 'wds', webdataset.__version__)" || exit 1

status=0
stage() {  # name, time limit (s), command...
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T), limit ${limit}s): $*"
  timeout "$limit" "$@" || { echo "=== $name FAILED (rc=$?)"; status=1; }
}

for s in $STAGES; do
  case $s in
    throughput)
      # Builds synthetic 224 px shards on local disk (cached), then ours (compute, e2e, breakdown)
      # and open_clip_train for ViT-B/32 on the same shards, batch, bf16 and workers.
      stage train_throughput 330 "$PY" -m benchmarks.train_throughput --models ViT-B-32 ViT-B-16 orbit-tiny \
        --batch-size "$BATCH" --steps "$STEPS" --warmup 5 --workers "$WORKERS" --breakdown --measure-peak \
        --openclip ViT-B-32 --out "$OUT/train_throughput.json" ;;
    memory)
      stage batch_memory 200 "$PY" -m benchmarks.batch_memory --model ViT-B-32 --micro "$MICRO" \
        --batches 1024 2048 4096 8192 16384 32768 65536 --out "$OUT/batch_memory.json" ;;
    data)
      stage data_throughput 240 "$PY" -m benchmarks.data_throughput --source synthetic --count 4000 \
        --workers 1 2 --repeats 2 --out "$OUT/data_throughput.json" ;;
    *) echo "unknown stage $s"; status=1 ;;
  esac
done
echo "=== done ($(date +%T)), status $status; JSON under $OUT"
exit $status
