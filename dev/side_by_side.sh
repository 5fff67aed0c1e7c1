#!/bin/bash
# Issue 16's speed ratios against an older commit, timed one after the other on this machine:
#   bash dev/side_by_side.sh [REF] [OUT]      (REF default 45ad673, OUT default runs/side-by-side-REF)
# REF runs from a temporary git worktree with this checkout's .venv and data. Commits before the faithful
# recipe (2c0db02) had other defaults, so REF's cells get the recipe's settings through --set: both sides
# then compute the same cells. Every side starts from an empty cache (the dataset tensors are linked in).
# Nothing else should run meanwhile. Parts (about 100 min on a 2-core CPU):
#   1. fusion seconds per round at the attack table's cpu-scale fusion (10,000 images, 300 steps x 64);
#   2. the default grid's 18 FedDF cells (the grid REF had) and the defense table's FM slice (18 cells);
#   3. a default-grid cell quiet at one thread, then beside one busy process;
#   4. REF's undefended FM cell at one thread, to compare metrics digit for digit.
# It ends with summary.md / summary.json in OUT.
set -u  # a failing part is logged and the rest still runs
REF=${1:-45ad673}
NEW=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mkdir -p "${2:-$NEW/runs/side-by-side-$REF}" && cd "${2:-$NEW/runs/side-by-side-$REF}" && pwd)
OLD=$OUT/worktree
source "$NEW/.venv/bin/activate"
[ -d "$OLD" ] || git -C "$NEW" worktree add --detach "$OLD" "$REF"
fresh_cache() {  # an empty cache folder holding only the dataset tensors
    mkdir -p "$OUT/$1/datasets"
    ln -sf "$NEW"/data/cache/datasets/cifar10.pt "$NEW"/data/cache/datasets/cifar10.json "$OUT/$1/datasets/"
    echo "$OUT/$1"
}
timed() {  # timed LOGNAME DIR command...: wall seconds into LOGNAME.seconds
    local name=$1 dir=$2; shift 2
    local start; start=$(date +%s.%N)
    (cd "$dir" && "$@") > "$OUT/$name.log" 2>&1
    python -c "import sys; print(float(sys.argv[1]) - float(sys.argv[2]))" "$(date +%s.%N)" "$start" > "$OUT/$name.seconds"
}
RECIPE=(--set data.augment=false --set fusion.augment=false --set fl.client.optimizer=adam
        --set fl.client.lr=0.001 --set fl.client.momentum=0.0 --set fl.client.weight_decay=0.0
        --set fl.client.batch_size=32 --set pretrain.optim.optimizer=adam --set pretrain.optim.lr=0.002
        --set pretrain.optim.momentum=0.0 --set pretrain.optim.weight_decay=0.0
        --set pretrain.optim.batch_size=32 --set fusion.alpha=0.25 --set fusion.temperature=1.0)
OLD_DATA=(--data-root "$NEW/data")

# 1. fusion at the attack table's cpu scale (2 rounds; clients and pre-training kept small: fusion does not
#    depend on them); the new side at 2 threads like REF's default, and at its own default of 1
FUSION=(--set synthetic.size=10000 --set fusion.steps=300 --set fl.rounds=2 --set data.client_pool_size=4000
        --set data.test_size=1000 --set pretrain.epochs=1)
timed fusion_ref "$OLD" python -m benchmarks.run "${RECIPE[@]}" "${FUSION[@]}" --set fusion.alpha=0.8 \
    --set runtime.cache_dir="$(fresh_cache cache_fusion_ref)" "${OLD_DATA[@]}" --out "$OUT/fusion_ref"
timed fusion_new2 "$NEW" python -m benchmarks.run "${FUSION[@]}" --set fusion.alpha=0.8 --set runtime.threads=2 \
    --no-stage-cache --set runtime.cache_dir="$(fresh_cache cache_fusion_new)" --out "$OUT/fusion_new2"
timed fusion_new1 "$NEW" python -m benchmarks.run "${FUSION[@]}" --set fusion.alpha=0.8 \
    --no-stage-cache --set runtime.cache_dir="$(fresh_cache cache_fusion_new)" --out "$OUT/fusion_new1"

# 2. grids as a user runs them (REF: one cell at a time, torch's default threads; new: its default on a
#    quiet 2-core machine, two cells of one thread)
timed grid_ref "$OLD" python -m benchmarks.grid "${RECIPE[@]}" --set runtime.cache_dir="$(fresh_cache cache_grid_ref)" \
    "${OLD_DATA[@]}" --out "$OUT/grid_ref"
timed grid_new "$NEW" python -m benchmarks.grid --only 'attack=none|badnets|fm' --jobs 2 \
    --set runtime.cache_dir="$(fresh_cache cache_grid_new)" --out "$OUT/grid_new"
DEFENSES='none|normclip|weakdp|krum|median|trimmedmean|bulyan|flame|foolsgold|rlr|fltrust|pruning|clp|finetune|fineprune|teacherfilter|actbound|multikrum'
timed defense_ref "$OLD" python -m benchmarks.grid --preset defense_table --only data.dataset=cifar10 \
    --only attack.name=fm --only seed=0 "${RECIPE[@]}" --set runtime.cache_dir="$(fresh_cache cache_defense_ref)" \
    "${OLD_DATA[@]}" --out "$OUT/defense_ref"
timed defense_new "$NEW" python -m benchmarks.grid --preset defense_table --only data.dataset=cifar10 \
    --only attack=fm --only seed=0 --only "defense=$DEFENSES" --jobs 2 \
    --set runtime.cache_dir="$(fresh_cache cache_defense_new)" --out "$OUT/defense_new"

# 3. one default-grid cell (stage cache off): quiet at one thread; beside a busy process at the default
#    (one thread) and at two threads
CELL_SETTINGS=(--set data.client_pool_size=20000 --set data.test_size=2000 --set synthetic.size=3000
               --set fl.rounds=2 --set pretrain.epochs=4 --set fusion.steps=50)
CELL=("${CELL_SETTINGS[@]}" --no-stage-cache)
timed cell_quiet "$NEW" python -m benchmarks.run "${CELL[@]}" --out "$OUT/cell_quiet"
python -c "while True: pass" & BUSY=$!
timed cell_busy "$NEW" python -m benchmarks.run "${CELL[@]}" --out "$OUT/cell_busy"
timed cell_busy_threads2 "$NEW" python -m benchmarks.run "${CELL[@]}" --set runtime.threads=2 --out "$OUT/cell_busy_threads2"
kill $BUSY

# 4. REF's undefended FM cell of the default grid at one thread (the new grid's cells run at one thread)
timed fm_ref_threads1 "$OLD" python -m benchmarks.run "${RECIPE[@]}" "${CELL_SETTINGS[@]}" --set attack.name=fm \
    --set runtime.threads=1 --set runtime.cache_dir="$(fresh_cache cache_grid_ref)" "${OLD_DATA[@]}" \
    --out "$OUT/fm_ref_threads1"

python "$NEW/dev/side_by_side_summary.py" "$OUT" "$REF"
