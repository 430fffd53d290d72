# The README's commands.
.PHONY: quickstart test test-fast lint bench
quickstart:
	bash scripts/quickstart.sh
test:
	bash scripts/test.sh
test-fast:
	.venv/bin/python -m pytest
lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check .
bench:
	.venv/bin/python bench/orpo_bench.py --device cpu
