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

test:
	.venv/bin/pytest -q

test-fast:
	.venv/bin/pytest -q -m "not slow"
