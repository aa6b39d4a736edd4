#!/usr/bin/env bash
# Runs the same seeded jobs with the dazoo code of a checkout, for before/after comparisons of a
# refactoring (issue 24): a 20-step dazoo train of examples/brain/recipe_v1.json, dazoo segment
# with both presets, dazoo register with both presets. Compare two outputs with
# benchmarks/compare_runs.py.
#   bash benchmarks/equivalence.sh CHECKOUT OUT     (e.g. a `git worktree add /tmp/old REV`)
# Needs ../shared/data beside this repository and a Python with dazoo's dependencies (PY).
set -x
CODE=$(cd "$1" && pwd); OUT=$2; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
PY=${PY:-python}
D=$(cd "$(dirname "$0")/../../shared/data" && pwd)
M=$D/mindboggle-oasis-trt20
export PYTHONPATH=$CODE
cd "$CODE"
$PY -m dazoo train examples/brain/recipe_v1.json -o "$OUT/run" --set training.steps=20 \
    --set data.train="\"$M\"" --set training.checkpoint_every=5 \
    --set training.validate_every=100000 > "$OUT/train.out" 2>&1
$PY -m dazoo segment "$M/OASIS-TRT-20-12/t1weighted_brain.nii.gz" \
    "$D/freesurfer-cohort/sub-01/brainmask.mgz" -o "$OUT/brain_seg/" > "$OUT/seg.out" 2>&1
$PY -m dazoo register "$M/OASIS-TRT-20-12/t1weighted_brain.nii.gz" \
    "$M/OASIS-TRT-20-13/t1weighted_brain.nii.gz" --moved "$OUT/brain_moved.nii.gz" \
    --warp "$OUT/brain_warp.nii.gz" --moving-labels "$M/OASIS-TRT-20-12/labels.DKT31.manual.nii.gz" \
    --moved-labels "$OUT/brain_moved_labels.nii.gz" > "$OUT/reg.out" 2>&1
$PY -m dazoo segment --preset knee "$D/knee-dess/dess_echo1.nii.gz" -o "$OUT/knee_seg/" \
    > "$OUT/kseg.out" 2>&1
$PY -m dazoo register --preset knee "$D/knee-dess/dess_echo1.nii.gz" \
    "$D/clair-knee-103r/CLAIR-Knee-103R_template_64x128x128.nii.gz" \
    --moved "$OUT/knee_moved.nii.gz" --warp "$OUT/knee_warp.nii.gz" > "$OUT/kreg.out" 2>&1
echo ALLDONE
