# Source on a device machine (no network), from the repository root, with .bench-kit/ carried
# (scripts/gpu_kit.sh): installs the kit's wheels once into $KIT_SITE (/tmp/site) and puts them and this
# repository on PYTHONPATH, beside the image's torch, transformers and lightning.
#   source scripts/gpu_env.sh && CPT_TEST_TOKENIZER=.bench-kit/tokenizer python3 -m pytest -q -rs tests/test_gpu.py \
#     tests/test_flash_varlen.py   (the tests' tokenizer from the kit: the sample's wheels are not fetched offline)
KIT_SITE=${KIT_SITE:-/tmp/site}
if [ ! -e "$KIT_SITE/.kit-installed" ]; then  # marked once whole: an install cut short is done again
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$KIT_SITE" \
    .bench-kit/wheels/*.whl || return 1
  : >"$KIT_SITE/.kit-installed"
fi
export PYTHONPATH="$KIT_SITE:$PWD" PYTHONUNBUFFERED=1
