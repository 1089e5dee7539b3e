#!/usr/bin/env bash
# The default model's method comparison (issues #6, #29): top-N layers, LoRA and full fine-tuning of
# SmolLM2-135M-Instruct on all four HH-RLHF subsets + the OpenAssistant ranked lists, same split and
# data for every run. Each run's dev figures land in RUNS/<name>/metrics.json. The defaults suit a GPU
# (max length 1024, no frozen-layer cache, runs in parallel). top7 is the shipped default model's recipe;
# its run (models/default/MODEL_CARD.md) was, on two CPU cores:
#   BB=... DEVICE=cpu PARALLEL=0 MAX_LENGTH=384 BATCH_TOKENS=8192 CACHE=on SAVE_EVERY=100 scripts/train_default.sh top7
# top8 and full write more than the 50 MB the repository ships. The card's slice comparison ran top4,
# top8, lora16 and full with those CPU settings plus --train-max 500 --dev-max 260 --time-limit 900 and
# more epochs on the small slice (8, 6, 3, 2; top4/top8 evaluated every 40/30 steps, keeping the best).
#
#   BB=<fetched backbone> DATA=../shared/data RUNS=/tmp/runs DEVICE=cuda scripts/train_default.sh [names...]
#
# On a GPU the runs go in parallel (small model: one run leaves most of the card idle); on a CPU set
# PARALLEL=0 and expect hours. LIMIT_S stops a run that overstays (its folder then has no metrics.json).
set -u
BB=${BB:?set BB to the fetched backbone folder (rmserve fetch-backbone)}
DATA=${DATA:-../shared/data}
RUNS=${RUNS:-runs}
DEVICE=${DEVICE:-cuda}
BATCH_TOKENS=${BATCH_TOKENS:-16384}
MAX_LENGTH=${MAX_LENGTH:-1024}
CACHE=${CACHE:-off}
SAVE_EVERY=${SAVE_EVERY:-0}
PARALLEL=${PARALLEL:-1}
LIMIT_S=${LIMIT_S:-0}
PY=${PY:-python3}
EXTRA=${EXTRA:-}  # appended to every run, e.g. "--max-steps 2" for a smoke test
mkdir -p "$RUNS"

common=(--backbone "$BB" --data "$DATA"/hh-rlhf/*.jsonl.gz "$DATA"/oasst/en_100_tree.jsonl
  --max-length "$MAX_LENGTH" --dev-fraction 0.1 --seed 0 --device "$DEVICE" --dtype bfloat16
  --batch-tokens "$BATCH_TOKENS" --eval-every 100 --save-every "$SAVE_EVERY" --cache-frozen "$CACHE")

declare -A runs=(
  [top4]="--method top-n --top-n 4 --lr 1e-4 --head-lr 1e-3 --epochs 2 --weight-decay 0.01"
  [top7]="--method top-n --top-n 7 --lr 1e-4 --head-lr 1e-3 --epochs 2 --weight-decay 0.01 --early-stopping-patience 4"
  [top8]="--method top-n --top-n 8 --lr 1e-4 --head-lr 1e-3 --epochs 2 --weight-decay 0.01"
  [lora16]="--method lora --lora-rank 16 --lora-alpha 32 --lr 2e-4 --head-lr 2e-3 --epochs 2 --weight-decay 0.01"
  [lora32]="--method lora --lora-rank 32 --lora-alpha 64 --lr 2e-4 --head-lr 2e-3 --epochs 2 --weight-decay 0.01 --early-stopping-patience 3"
  [full]="--method full --lr 2e-5 --head-lr 1e-3 --epochs 2 --weight-decay 0.01"
)
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(top4 top7 top8 lora16 lora32 full)

pids=()
for name in "${names[@]}"; do
  # shellcheck disable=SC2206
  extra=(${runs[$name]:?unknown run $name} $EXTRA)
  cmd=("$PY" -m service.cli train "${common[@]}" "${extra[@]}" --out "$RUNS/$name")
  [ "$LIMIT_S" -gt 0 ] && cmd=(timeout "$LIMIT_S" "${cmd[@]}")
  echo "== $name: ${cmd[*]}" | tee "$RUNS/$name.log"
  if [ "$PARALLEL" = 1 ]; then
    "${cmd[@]}" >>"$RUNS/$name.log" 2>&1 &
    pids+=($!)
  else
    "${cmd[@]}" >>"$RUNS/$name.log" 2>&1
  fi
done
for p in "${pids[@]}"; do wait "$p"; done
for name in "${names[@]}"; do
  if [ -f "$RUNS/$name/metrics.json" ]; then
    "$PY" -c "import json,sys; m=json.load(open(sys.argv[1])); d=m['dev']; t=m['training']; \
print(sys.argv[2], 'dev', round(d['accuracy'],4), {k: round(v['accuracy'],3) for k,v in d['subsets'].items()}, \
'shorter', d.get('accuracy_when_better_is_shorter'), 's', t['seconds'], 'tok/s', t['tokens_per_s'])" \
      "$RUNS/$name/metrics.json" "$name"
  else
    echo "$name: no metrics.json (failed or stopped); last lines:"; tail -5 "$RUNS/$name.log"
  fi
done
