# `make bench`: included by the top-level Makefile. tests/bench/__init__.py maps the package; the results
# land in tests/bench/results/<date>.md with a PNG chart. BENCH_ARGS passes options, e.g. BENCH_ARGS=--quick.
.PHONY: bench
BENCH_ARGS  ?=

bench: $(STAMP) ## measure delivery and enqueue vs the raw SMTP limit and Celery (tests/bench/results/)
	$(BIN)/python -m tests.bench $(BENCH_ARGS)
