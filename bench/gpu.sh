#!/usr/bin/env bash
# Every GPU check of salt in one command, on one GPU host, within about 9 minutes:
#
#   SALT_COMMIT=$(git rev-parse --short HEAD) bench/gpu.sh [--out DIR]    (on the GPU)
#   PYTHON=.venv/bin/python bench/gpu.sh --small --out /tmp/gpu-small      (on a CPU, small shapes)
#
# Installs the wheels in .whl/ when there is one (`../shared/device/wheels.sh tokenizers==0.23.3` fills it;
# copy ../shared/bench/liger_kd.py there too, since a device gets the working tree only),
# then, most important first: attention per layer and its parity with the XLA reference
# (bench/attention.py); the 1.47B student's step and MFU for three remat policies
# (bench/step.py); the teacher-student loss with Liger in the same run (bench/kernel.py,
# ../shared/bench/liger_kd.py), token_chunks at two more chunk sizes; the SALT stage-1
# overhead; the checkpoint overhead; `salt dryrun`. Each figure is one JSON line in DIR/results.jsonl (DIR: --out, else
# $OUT); each check's output is in DIR/<check>.log. A check that fails or runs out of
# the time left is listed in DIR/failed.txt and the rest go on.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-}
small=0
while [ $# -gt 0 ]; do
  case $1 in
    --out) out=$2; shift 2 ;;
    --small) small=1; shift ;;
    *) echo "usage: bench/gpu.sh [--out DIR] [--small]" >&2; exit 2 ;;
  esac
done
[ -n "$out" ] || { echo "bench/gpu.sh: give --out DIR or set OUT" >&2; exit 2; }
mkdir -p "$out"
export SALT_RESULTS=$out/results.jsonl SALT_COMMIT=${SALT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
PYTHON=${PYTHON:-python3}
# The peer of the loss. A device gets only the working tree, so carry a copy in .whl/.
liger=${LIGER_KD:-../shared/bench/liger_kd.py}
[ -f "$liger" ] || liger=.whl/liger_kd.py
if compgen -G '.whl/*.whl' >/dev/null; then
  $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
if [ $small = 1 ]; then budget=900; else budget=530; fi
deadline=$((SECONDS + budget))

# check NAME CAP_SECONDS COMMAND...: runs COMMAND for at most CAP seconds and the time left.
check() {
  local name=$1 cap=$2 left=$((deadline - SECONDS))
  shift 2
  if [ $left -lt 15 ]; then echo "$name: skipped, out of time" | tee -a "$out/failed.txt"; return; fi
  [ $cap -lt $left ] || cap=$left
  echo "== $name (at most ${cap}s): $*"
  timeout "$cap" "$@" > "$out/$name.log" 2>&1
  local code=$?
  grep -v '^{' "$out/$name.log" | grep -iE 'error|failed|# ' | tail -n 5
  [ $code = 0 ] || echo "$name: exit $code" | tee -a "$out/failed.txt"
}

if [ $small = 1 ]; then
  check attention 300 $PYTHON -m bench.attention --batch 2 --seq 256 --heads 4 --kv-heads 2 --head-dim 32 \
    --dtype float32 --mean-doc 64 --repeats 2
  check attention-window 300 $PYTHON -m bench.attention --batch 2 --seq 256 --heads 4 --kv-heads 2 --head-dim 32 \
    --dtype float32 --mean-doc 64 --repeats 2 --window 32
  for remat in save_nothing save_matmuls_and_attention; do
    check "step-$remat" 300 $PYTHON -m bench.step --config configs/demo.py --steps 2 --config.model.remat=$remat
  done
  check kernel 300 $PYTHON -m bench.kernel --tokens 256 --student-width 64 --teacher-width 32 --vocab 1024 \
    --impls xla,pallas,token_chunks --repeats 1
  check salt_overhead 300 $PYTHON -m bench.salt_overhead --steps 2
  check checkpoint 300 $PYTHON -m bench.checkpoint --dir "$out/ckpt" --steps 1 --config.model.n_layers=2 \
    --config.model.d_model=256 --config.model.d_ff=512 --config.model.head_dim=16
  check dryrun 300 $PYTHON -m trainer.cli dryrun --config configs/demo.py --steps 1 --workdir "$out/dryrun"
else
  slm=(--config configs/paper.py:slm --config.data.global_batch_size=16)
  check attention 60 $PYTHON -m bench.attention
  # Mistral's and Gemma 3's sliding windows (Gemma 3 1B: 512 tokens).
  check attention-window 40 $PYTHON -m bench.attention --window 512
  check step-save_matmuls_and_attention 110 $PYTHON -m bench.step "${slm[@]}" --steps 10 \
    --config.model.remat=save_matmuls_and_attention --profile "$out/profile"
  # A trace is hundreds of files; one archive keeps it from crowding out the results.
  [ -d "$out/profile" ] && tar -czf "$out/profile.tgz" -C "$out" profile && rm -rf "$out/profile"
  if [ -f "$liger" ] && $PYTHON -c 'import torch, liger_kernel' 2>/dev/null; then
    check liger 60 env BT=8192 DS=2048 DT=1024 VS=32768,131072,262144 $PYTHON "$liger"
    grep '^{' "$out/liger.log" > "$out/liger.jsonl"
  else
    echo "liger: skipped, no $liger or no torch and liger_kernel" | tee -a "$out/failed.txt"
  fi
  check kernel 100 $PYTHON -m bench.kernel --impls naive,xla,token_chunks --repeats 5 --liger "$out/liger.jsonl"
  for chunk in 512 2048; do
    check "kernel-chunk$chunk" 60 $PYTHON -m bench.kernel --impls token_chunks --vocab 131072,262144 \
      --chunk-tokens $chunk --repeats 5 --liger "$out/liger.jsonl"
  done
  check step-save_nothing 90 $PYTHON -m bench.step "${slm[@]}" --steps 10 --config.model.remat=save_nothing
  check step-save_matmuls 90 $PYTHON -m bench.step "${slm[@]}" --steps 10 --config.model.remat=save_matmuls
  check salt_overhead 90 $PYTHON -m bench.salt_overhead --student configs/paper.py:llm \
    --teacher configs/paper.py:slm --steps 5 --config.data.global_batch_size=8
  check checkpoint 60 $PYTHON -m bench.checkpoint --dir "$out/ckpt"
  # The dry run of the 1.47B student took 115 s on an H200 (2026-12-04), its checkpoint round trip included.
  check dryrun 140 $PYTHON -m trainer.cli dryrun "${slm[@]}" --steps 2 --workdir "$out/dryrun"
fi
rm -rf "$out/ckpt" "$out/dryrun"
echo "results: $SALT_RESULTS ($(wc -l < "$SALT_RESULTS" 2>/dev/null || echo 0) figures); failed: $(cat "$out/failed.txt" 2>/dev/null | wc -l)"
