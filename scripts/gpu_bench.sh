#!/usr/bin/env bash
# On a device machine (no network), from the repository root, with .bench-kit/ carried (scripts/gpu_kit.sh):
# one `cpt bench` run of configs/bench/gpu_base.yaml.
#   bash scripts/gpu_bench.sh NAME [cpt bench options] [-- LightningCLI overrides]
# writes $OUT/NAME.json (the report) and $OUT/NAME.log (everything printed).
set -uo pipefail
name=$1; shift
out=${OUT:-runs/bench}
mkdir -p "$out"
source scripts/gpu_env.sh || exit 1
python3 -m cpt_lightning.cli bench --config configs/bench/gpu_base.yaml --out "$out/$name.json" "$@" 2>&1 | tee "$out/$name.log"
