#!/bin/sh
# The study of where loops pay, at a budget a GPU trains in minutes: dense, the default LoopUS recipe and
# `iterate` fine-tuned on the same copy chains (pointer chasing, trained on depths 1-4), scored at every
# depth to 16 (the looped arms at 1, 2, 4, 8 and 16 loops and under each exit rule), the forgetting check
# for each, and the report. Every step resumes or is skipped when done, so a cut run is continued by
# running it again. On the 2-core CPU the same study at 200 steps x 16 left dense SFT at chance
# (docs/RESULTS.md, "Where loops pay: copy chains"); this is the budget to try next.
#
#     LOOPUS_DATA=../shared/data sh bench/reasoning_gpu.sh               # OUT=runs/dc_gpu STEPS=2000 BATCH=32
#     STEPS=2 BATCH=2 LIMIT=2 TRAIN_SIZE=8 TOKENS=256 OUT=/tmp/dc sh bench/reasoning_gpu.sh   # CPU smoke test
set -eu
OUT=${OUT:-runs/dc_gpu}
STEPS=${STEPS:-2000}
BATCH=${BATCH:-32}
LIMIT=${LIMIT:-200}
TRAIN_SIZE=${TRAIN_SIZE:-16000}  # per depth: STEPS x BATCH examples, none of them seen twice
TOKENS=${TOKENS:-8192}  # held-out enwiki tokens of the forgetting check
PYTHON=${PYTHON:-python}
study() { "$PYTHON" "$(dirname "$0")/reasoning.py" --out "$OUT" "$@"; }

study --task depthchain --operation copy --distractors 1 --train-depths 1-4 --test-depths 1-16 \
    --train-size "$TRAIN_SIZE" --steps "$STEPS" --batch-size "$BATCH" --seq-len 72 --lr 1e-4 \
    --eval-every $((STEPS / 10 > 0 ? STEPS / 10 : 1)) --eval-loops 1,4 --valid-examples 200 \
    --save-every $((STEPS / 4 > 0 ? STEPS / 4 : 1)) train dense
for arm in iterate default; do
    study train "$arm"
done
for arm in base dense iterate default; do
    study score "$arm" --limit "$LIMIT" --exit-limit "$LIMIT" --items-per-batch 32
done
for arm in base dense iterate default; do
    study forgetting "$arm" --limit "$LIMIT" --tokens "$TOKENS"
done
study report
