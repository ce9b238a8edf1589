#!/usr/bin/env bash
# The GPU check: every stage in one call per group, each stage writing its own JSON as it goes.
#
# 1. Here (with network), once:   bash benchmarks/run_gpu.sh fetch-wheels
#    -> .whl/ (git-ignored, < 64 MiB): wheels for CPython 3.12 manylinux x86-64 that the GPU
#       image lacks: open_clip_torch, webdataset 1.0.2 (+ .whl/ref/webdataset 0.2.86 for
#       open_clip_train), braceexpand, ftfy, wcwidth, deepspeed 0.19.7 (built here) and what it
#       needs beyond the image (hjson, pydantic; the image has msgpack, ninja, psutil, py-cpuinfo,
#       tensorboard, pandas: KINDS.md); and .gpu-data/ (EuroSAT RGB from $ORBITCLIP_DATA, for the
#       recipes). About 27 MiB in all.
# 2. Device tool, one call per group (each sized for 6 minutes on one H100/H200):
#      run(command="STAGES=A bash benchmarks/run_gpu.sh", carry=[".whl", ".gpu-data"], timeout_s=420)
#      run(command="STAGES=B bash benchmarks/run_gpu.sh", carry=[".whl", ".gpu-data"], timeout_s=420)
#    -> $OUT/<stage>.json per stage and $OUT/run_gpu.log
# 3. Here, without a GPU:         bash benchmarks/run_gpu.sh --cpu-smoke
#    every stage at tiny size on CPU through the same code (run by `make test`).
#
# Stages (group A | group B; STAGES may also list stage names):
#   A  train_accum      python -m train, ViT-B/32 bf16, 224 px shards, DDP accum 1 and 4
#      train_resume     SIGKILL after a checkpoint, resume, compare with the uninterrupted run
#      train_two_procs  two ranks on the one GPU (gloo over CUDA tensors) vs one rank
#      train_zero       DeepSpeed ZeRO 1/2/3, world 1, through python -m train: peak memory
#   B  train_throughput ViT-B/32 ours vs open_clip_train (same shards, batch, bf16, workers), MFU
#      batch_memory     effective batch 1k -> 65k through the feature cache, one process per size
#      recipes          the GPU recipes cut to a short run, evaluated by the harness
#      data_throughput  our loader vs open_clip's, samples per CPU-second
# A stage that fails or hits its time limit keeps the other stages' JSON and its own
# finished rows; the script's exit status is non-zero if any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
if [ "${1:-}" = "--cpu-smoke" ]; then SMOKE=1; shift; fi

PY=${PYTHON:-python3}
[ $SMOKE = 1 ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
if [ "${1:-}" = "fetch-wheels" ]; then
  PY=${PYTHON:-.venv/bin/python}
  set -e
  rm -rf .whl && mkdir -p .whl/ref .whl/build
  target=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --platform manylinux2014_x86_64)
  "$PY" -m pip download -q --no-deps "${target[@]}" -d .whl \
    open_clip_torch==3.3.0 webdataset==1.0.2 braceexpand==0.1.7 ftfy==6.3.1 wcwidth==0.2.13 \
    hjson==3.1.0 pydantic==2.11.7 pydantic-core==2.33.2 annotated-types==0.7.0 typing-inspection==0.4.1
  "$PY" -m pip download -q --no-deps "${target[@]}" -d .whl/ref webdataset==0.2.86
  # DeepSpeed ships an sdist only: build the (pure-Python, ops compiled at run time) wheel here.
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl/build deepspeed==0.19.7
  mv .whl/build/deepspeed-*.whl .whl/ && rmdir .whl/build
  data=${ORBITCLIP_DATA:-../shared/data}
  if [ -d "$data/eurosat_rgb" ]; then rm -rf .gpu-data && mkdir -p .gpu-data && cp -r "$data/eurosat_rgb" .gpu-data/; fi
  du -sh .whl .gpu-data 2>/dev/null; ls .whl .whl/ref
  exit 0
fi

OUT=${OUT:-runs/benchmarks}
mkdir -p "$OUT"
LOG="$OUT/run_gpu.log"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1
STAGES=${STAGES:-A B}
STAGES=${STAGES//A/train_accum train_resume train_two_procs train_zero}
STAGES=${STAGES//B/train_throughput batch_memory recipes data_throughput}
[ -d .gpu-data ] && export ORBITCLIP_DATA=${ORBITCLIP_DATA:-$PWD/.gpu-data}

if [ -d .whl ] && [ $SMOKE = 0 ]; then
  # Ours: the wheels into /tmp/site. Reference: webdataset 0.2.86 into the side environment
  # benchmarks.openclip_ref uses (pandas comes from the image). Subprocesses keep PYTHONPATH.
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl || exit 1
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target .cache/openclip_ref .whl/ref/*.whl || exit 1
  printf 'webdataset==0.2.86\npandas\n' > .cache/openclip_ref/.installed
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
if [ $SMOKE = 1 ]; then
  # Tiny sizes on CPU, same stages and code. One thread per process: stages start several.
  export OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=""
  RUNS=(--smoke --precision fp32 --workers 1 --timeout 300)
  THROUGHPUT=(--models orbit-micro --openclip orbit-micro --batch-size 16 --steps 3 --warmup 1 --workers 1
              --shard-image-size 32 --breakdown --device cpu)
  MEMORY=(--model orbit-micro --micro 16 --batches 16 64 --steps 1 --warmup 1 --device cpu --plan)
  RECIPE=(eurosat_scratch_gpu train.steps=2 train.device=cpu train.precision=fp32 model.name=orbit-micro
          data.batch_size=16 data.workers=1 data.shuffle_buffer=16 eval.every=0 train.log_every=1)
  DATA=(--source synthetic --count 64 --image-size 32 --batch-size 16 --batches 2 --warmup 1 --workers 1 --repeats 1)
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  RUNS=(--steps 40 --batch 256 --workers 12 --timeout 150)
  THROUGHPUT=(--models ViT-B-32 --openclip ViT-B-32 --batch-size 256 --steps 30 --warmup 5 --workers 12
              --breakdown --measure-peak)
  MEMORY=(--model ViT-B-32 --micro 512 --batches 1024 4096 16384 65536 --timeout 60 --plan)
  RECIPE=(eurosat_scratch_gpu train.steps=600 eval.every=0)
  DATA=(--source synthetic --count 2000 --workers 1 2 --repeats 1)
fi
"$PY" -c "import train.core.compat; train.core.compat.ensure_torchvision(); import torch, open_clip, webdataset; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'open_clip', open_clip.__version__, 'wds', webdataset.__version__)" || exit 1

status=0
stage() {  # name, time limit (s; LIMIT_<name> overrides), command... (ARGS_<name> appends arguments)
  local name=$1 limit=$2; shift 2
  local var="LIMIT_$name"; limit=${!var:-$limit}
  local extra="ARGS_$name"; read -r -a extra <<< "${!extra:-}"
  echo "=== $name ($(date +%T), limit ${limit}s): $* ${extra[*]}"
  timeout --kill-after=10 "$limit" "$@" "${extra[@]}"
  local rc=$?
  if [ $rc != 0 ]; then echo "=== $name FAILED (rc=$rc$([ $rc = 124 ] && echo ', time limit'))"; status=1; fi
}

# Limits: group A 75+100+70+80 = 325 s, group B 120+100+70+30 = 320 s on one H100/H200
# (estimates; the CPU smoke runs the same stages at tiny size, with its own larger limits).
big() { [ $SMOKE = 1 ] && echo "$2" || echo "$1"; }
for s in $STAGES; do
  case $s in
    train_accum)      stage $s "$(big 75 240)" "$PY" -m benchmarks.train_runs accum "${RUNS[@]}" --out "$OUT/$s.json" ;;
    train_resume)     stage $s "$(big 100 240)" "$PY" -m benchmarks.train_runs resume "${RUNS[@]}" --out "$OUT/$s.json" ;;
    train_two_procs)  stage $s "$(big 70 240)" "$PY" -m benchmarks.train_runs two-procs "${RUNS[@]}" --out "$OUT/$s.json" ;;
    train_zero)       stage $s "$(big 80 600)" "$PY" -m benchmarks.train_runs zero "${RUNS[@]}" --out "$OUT/$s.json" ;;
    train_throughput) stage $s "$(big 120 300)" "$PY" -m benchmarks.train_throughput "${THROUGHPUT[@]}" --out "$OUT/$s.json" ;;
    batch_memory)     stage $s "$(big 100 240)" "$PY" -m benchmarks.batch_memory "${MEMORY[@]}" --out "$OUT/$s.json" ;;
    recipes)          stage $s "$(big 70 300)" "$PY" -m benchmarks.recipes stage "${RECIPE[@]}" --out "$OUT/$s.json" ;;
    data_throughput)  stage $s "$(big 30 240)" "$PY" -m benchmarks.data_throughput "${DATA[@]}" --out "$OUT/$s.json" ;;
    *) echo "unknown stage $s"; status=1 ;;
  esac
done
echo "=== done ($(date +%T)), status $status; JSON under $OUT"
exit $status
