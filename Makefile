# Two commands for a new user: `make setup` then `make demo`. Tests: `make test`.
PY := .venv/bin/python
CPT := .venv/bin/cpt
SAMPLE := data/sample
DEMO_BLOCK := 256

.PHONY: setup demo demo-data test test-fast

setup:
	bash scripts/setup.sh

demo-data:
	$(CPT) data sample --out $(SAMPLE)
	for source in pubmed medical_qa case_reports; do \
		$(CPT) prepare $(SAMPLE)/raw/$$source.jsonl --output $(SAMPLE)/prepared/$$source \
			--tokenizer $(SAMPLE)/tokenizer --block-size $(DEMO_BLOCK) --overwrite || exit 1; \
	done

# The demo starts over each time; `cpt fit` itself refuses a fresh run beside an earlier run's checkpoints.
demo: demo-data
	@if [ -d runs/demo ]; then echo "make demo: replacing the previous demo run in runs/demo"; rm -rf runs/demo; fi
	$(CPT) fit --config configs/demo_cpu.yaml
	@echo "TensorBoard: .venv/bin/tensorboard --logdir runs/demo"

# One pytest-xdist worker per core, a test file per worker (its module fixtures, such as a reference run, are
# built once), one thread per worker and per run it starts: several OpenMP threads per worker outnumber the
# cores and spin against each other. On 2 cores, from empty caches: 18.5 min in one process, 14.9 min with
# 2 workers of 2 threads, 11.0 min with 2 workers of 1 thread. Files go out in the order tests/conftest.py
# sets (the most end-to-end tests first), not xdist's (the most tests first), so the longest file starts first.
# Single runs vary: 9.9 and 12.0 min in this order, 12.3 in xdist's (836 tests, one working tree, 2026-12-02).
# CPUs vary more: on a 2-core AVX2-only box (no native bf16) the suite took 19.3 min (896 tests, 2026-12-02).
PYTEST := OMP_NUM_THREADS=1 .venv/bin/pytest -q -n auto --dist loadfile --no-loadscope-reorder

test:
	$(PYTEST)

test-fast:
	$(PYTEST) -m "not slow"
