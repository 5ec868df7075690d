#!/usr/bin/env bash
# A GPU session's measurements in named stages, each under its own time limit, so one device call
# (10 minutes at most) runs several and a stage that fails or hangs does not take the others with it.
# On a device machine, from the repository root, with .bench-kit/ carried (scripts/gpu_kit.sh), one call
# (run timeout_s=600) with the stages in order of value, the throughput first:
#   DEADLINE_S=570 bash scripts/gpu_session.sh sdpa flex tests flex_compiled sweep masks loss
# DEADLINE_S (seconds from the script's start) shortens or skips the stages that would run past it, so
# the script packs its results before the call's limit kills it; set it ~30 s under the call's limit:
# timeout_s, or status's budget_left_s where that is less (a machine's start is spent from it first).
# A second call, while the machine is warm: `freeze` first (about 3–4 minutes are left for it), then
# what the summary shows skipped or cut, then `profile`.
# Every stage writes to runs/gpu_session/: NAME.json / NAME.log, summary.txt (stage, exit code, seconds),
# and prints its log's last lines (the device call's output_tail).
# A device call brings back at most 8 files from $OUT, and one call makes 9 or more, so before the first
# stage and after each the folder is packed into $OUT/gpu_session.tar.gz (with summary.txt beside it).
# Back here:
#   mkdir -p runs/gpu_session && tar -xzf <fetched>/gpu_session.tar.gz -C runs/gpu_session
#   .venv/bin/python scripts/bench_table.py runs/gpu_session/sdpa.json runs/gpu_session/flex.json ...
# EXTRA_OVERRIDES (word-split) is appended to every bench's overrides: a CPU dry run shrinks the model with it.
set -uo pipefail
export out=runs/gpu_session EXTRA_OVERRIDES=${EXTRA_OVERRIDES:-}
mkdir -p "$out"
: >>"$out/summary.txt"

pack() {  # runs/gpu_session → $OUT/gpu_session.tar.gz (written aside, then renamed: never a torn archive)
  [ -n "${OUT:-}" ] || return 0
  # tar exits 1 (and says so on stderr, which would fill the call's output_tail) when a running stage's log grows as
  # it reads it; the archive is whole all the same: whether it is, is read back
  tar -czf "$OUT/.gpu_session.tar.gz" -C "$out" . 2>/dev/null
  tar -tzf "$OUT/.gpu_session.tar.gz" >/dev/null 2>&1 && mv "$OUT/.gpu_session.tar.gz" "$OUT/gpu_session.tar.gz"
  cp "$out/summary.txt" "$OUT/summary.txt"
}

# A typo in a stage's name or a DEADLINE_S that is no whole number (570.5, 570s) would cost the call's stages after
# it, or all of them: refused before the machine is touched.
STAGES="tests masks loss sdpa flex flex_compiled sweep profile freeze"
refuse() { echo "refused: $1; nothing was run" | tee -a "$out/summary.txt" >&2; pack; exit 2; }
[[ -z ${DEADLINE_S:-} || $DEADLINE_S =~ ^[0-9]+$ ]] || refuse "DEADLINE_S=$DEADLINE_S is not whole seconds (570)"
for name in "$@"; do
  [[ " $STAGES " == *" $name "* ]] || refuse "unknown stage $name (the stages: $STAGES)"
done

nvidia-smi >"$out/nvidia-smi.txt" 2>&1
if ! source scripts/gpu_env.sh >"$out/env.log" 2>&1; then
  echo "env exit=1 (installing .bench-kit/wheels failed)" | tee -a "$out/summary.txt"
  tail -n 15 "$out/env.log"
  pack
  exit 1
fi
pack  # the machine's description comes back even if the first stage never ends

bench() {  # bench NAME [cpt bench options] -- [overrides]: one `cpt bench` of configs/bench/gpu_base.yaml
  local name=$1; shift
  # shellcheck disable=SC2086
  python3 -m cpt_lightning.cli bench --config configs/bench/gpu_base.yaml --out "$out/$name.json" "$@" $EXTRA_OVERRIDES
}

stage() {  # stage NAME LIMIT_S COMMAND...: output to NAME.log, one summary line, the log's tail on stdout
  local name=$1 limit=$2; shift 2
  if [ -n "${DEADLINE_S:-}" ]; then  # end in time to pack before the device call's own limit kills the script
    local left=$((DEADLINE_S - SECONDS - 15))
    if [ "$left" -lt 10 ]; then echo "$name skipped: ${left}s left before DEADLINE_S" | tee -a "$out/summary.txt"; pack; return 0; fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  local started=$SECONDS
  # Lightning turns SIGTERM into a flag read between batches, so a python hung inside a step outlives the
  # shell that timeout watches: once timeout returns, its process group (the stage's every process, loader
  # workers included) is killed, so nothing holds the GPU into the next stage.
  timeout -k 10 "$limit" bash -c '"$@"' _ "$@" >"$out/$name.log" 2>&1 &
  local group=$! running
  # Packed every PACK_EVERY_S while it runs too: should the call's own limit come first (less device time left
  # than DEADLINE_S allowed for), the archive still holds where the stage had got to. The packer stops with the
  # stage, or with the script.
  running=$(mktemp)
  ( i=0; while sleep 1 && [ -e "$running" ] && kill -0 $$ 2>/dev/null; do
      i=$((i + 1)); [ $((i % ${PACK_EVERY_S:-20})) -eq 0 ] && pack; done ) &
  local packer=$!
  wait $group
  local code=$?
  rm -f "$running"
  wait $packer
  kill -KILL -- "-$group" 2>/dev/null
  echo "$name exit=$code seconds=$((SECONDS - started)) limit=$limit" | tee -a "$out/summary.txt"
  tail -n 15 "$out/$name.log" | sed "s/^/  $name| /"
  pack
  return $code
}

sweep() {  # the largest micro-batch at 8192 tokens with FlexAttention (an out-of-memory error ends it);
  # CLM only: its head runs on every position, so it needs at least MLM's memory. Activations are about
  # 34·hidden bytes per token and layer in bf16 (4.4 GiB per 8192-token row of ModernBERT-base), so an
  # 80 GB H100 holds about 16 rows and an H200's 141 GB about 30: 8 → 32 brackets either; peak GiB grows
  # linearly with the rows, so the sizes that fit also give the other chip's limit.
  # The stage fails unless micro-batch 8 runs and every failure after it is out of memory. One micro-batch per
  # step: memory is what it measures, and it needs no accumulation.
  local fitted=0
  for rows in 8 12 16 24 32; do
    if bench "flex_mb$rows" --objectives clm --steps 2 --warmup 1 -- --model.init_args.attn_implementation=flex_attention \
      --data.init_args.micro_batch_size=$rows --trainer.accumulate_grad_batches=1; then
      fitted=$rows
    elif grep -qi "out of memory" "$out/sweep.log"; then
      break
    else
      echo "sweep: micro-batch $rows failed, not for memory"; return 1
    fi
  done
  echo "sweep: the largest micro-batch that ran: $fitted"
  [ "$fitted" -gt 0 ]
}

profile() {  # where a step's GPU time goes, per objective: Lightning's PyTorchProfiler report (text, no trace)
  for objective in clm mlm; do
    bench "profile_$objective" --objectives $objective --steps 3 --warmup 2 -- \
      --model.init_args.attn_implementation=flex_attention --trainer.accumulate_grad_batches=1 \
      --trainer.profiler=lightning.pytorch.profilers.PyTorchProfiler --trainer.profiler.dirpath="$out" \
      --trainer.profiler.filename="profile_$objective" --trainer.profiler.sort_by_key=cuda_time_total \
      --trainer.profiler.row_limit=80 --trainer.profiler.export_to_chrome=false
  done
}

export -f bench sweep profile

for name in "$@"; do
  case $name in
    tests) CPT_TEST_TOKENIZER=.bench-kit/tokenizer stage tests 180 python3 -m pytest -q -rs tests/test_gpu.py \
      tests/test_flash_varlen.py tests/test_attention.py::test_tile_level_block_masks_equal_create_block_mask ;;
    masks) stage masks 90 python3 benchmarks/attention_masks.py --device cuda --prepared .bench-kit/prepared/pubmed --rows 4 ;;
    loss) stage loss 120 python3 benchmarks/fused_loss.py --positions 32768 --chunk 4096 --repeats 5 --device cuda --bf16 ;;
    sdpa) stage sdpa 120 bench sdpa --steps 3 --warmup 1 -- --model.init_args.attn_implementation=sdpa ;;
    flex) stage flex 150 bench flex --steps 3 --warmup 1 -- --model.init_args.attn_implementation=flex_attention ;;
    flex_compiled) stage flex_compiled 240 bench flex_compiled --steps 3 --warmup 1 -- \
      --model.init_args.attn_implementation=flex_attention --model.init_args.compile=true ;;
    sweep) stage sweep 240 sweep ;;
    profile) stage profile 180 profile ;;
    freeze) stage freeze 120 bench freeze --objectives clm --steps 3 --warmup 1 -- \
      --model.init_args.attn_implementation=flex_attention --trainer.callbacks+=callbacks.LayerFreeze \
      --trainer.callbacks.layers=0-7 ;;
  esac
done
exit 0
