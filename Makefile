# The two entry points of the README. Both set up .venv on their own first.
PYTHON := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: env demo test benchmark clean

env:
	bash scripts/setup_env.sh

demo: env
	$(PYTHON) tools/run_demo.py $(DEMO_ARGS)

test: env
	$(PYTHON) -m pytest -n 2 tests $(PYTEST_ARGS)

benchmark: env
	$(PYTHON) tools/benchmark.py $(BENCH_ARGS)

clean:
	rm -rf output/demo
