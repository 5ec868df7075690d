#!/usr/bin/env bash
# Build .bench-kit/ here, for `cpt bench` on a device machine that reaches no network:
#   tokenizer/   the ModernBERT tokenizer rebuilt offline (cpt data sample)
#   prepared/    the three sample sources prepared at 8192 tokens (configs/bench/gpu_base.yaml reads them)
#   wheels/      the Python packages the device image lacks, and a transformers the suite passed on
# 60 MiB (the device call carries 64 MiB in all, the working tree's 2 MiB included: checked at the end); it travels
# with `carry: [".bench-kit"]`. Then on the device: scripts/gpu_session.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=.bench-kit
CPT=.venv/bin/cpt

$CPT data sample --out data/sample
mkdir -p "$KIT/prepared"
rm -rf "$KIT/tokenizer" && cp -r data/sample/tokenizer "$KIT/tokenizer"
for source in pubmed medical_qa case_reports; do  # --overwrite: an older kit's preparation is replaced, not refused
  $CPT prepare "data/sample/raw/$source.jsonl" --output "$KIT/prepared/$source" --tokenizer "$KIT/tokenizer" \
    --block-size 8192 --holdout-tokens 0 --quiet --overwrite
done

# Versions as installed by `make setup` here; cp312 manylinux builds for the device's Python 3.12.
installed() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
packages=()
for name in litdata jsonargparse docstring_parser typeshed_client boto3 botocore jmespath s3transfer obstore regex; do
  packages+=("$name==$(installed "$name")")
done
# transformers too, not the image's 5.17: 5.24.0, in pyproject's tested range and the newest whose
# huggingface_hub need (>= 1.31, checked at import) the image's 1.33.0 meets; 5.25 needs hub >= 2.4, which
# brings packages of its own. regex above: transformers checks it at import (>= 2025.10.22; the image's
# version is not known). Its other needs are in the image at versions it accepts.
packages+=("transformers==5.24.0")
rm -rf "$KIT/wheels"
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$KIT/wheels" "${packages[@]}"

# What a device call carries: the kit and the working tree (tracked files and untracked ones git does not ignore).
# Over 63 MiB (1 MiB under the call's limit) the call would be refused; the kit re-pins whatever is installed
# here, so a newer botocore or transformers can push it over.
MIB=1048576
kit=$(du -sb "$KIT" | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s -- 2>/dev/null | awk '{s += $1} END {print s + 0}' || true)
awk -v kit="$kit" -v tree="$tree" -v mib=$MIB -v name="$KIT" 'BEGIN {
  printf "%s: %.1f MiB + working tree %.1f MiB = %.1f MiB of the 64 a device call carries\n", name, kit / mib, tree / mib, (kit + tree) / mib }'
if (( kit + tree > 63 * MIB )); then
  echo "error: too much for one device call: the largest wheels in $KIT/wheels are" >&2
  ls -S -s --block-size=M "$KIT/wheels" | sed -n 2,4p >&2
  echo "pin older ones in scripts/gpu_kit.sh, or leave untracked files out of the working tree" >&2
  exit 1
fi
