# The two commands a newcomer needs: `make serve` and `make test`. Both do all set-up first.
.PHONY: setup serve test bench clean

setup:
	@bash scripts/setup.sh

serve: setup
	@.venv/bin/python scripts/serve.py --config configs/local.toml

test: setup
	@bash scripts/test.sh

bench: setup
	@.venv/bin/python perf/compare.py

clean:
	rm -rf .venv .cache triton/server triton/perf_analyzer
