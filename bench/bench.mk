# `make bench`: included by the top-level Makefile. bench/__init__.py maps the package; the results
# land in bench/results/<date>.md with a PNG chart. BENCH_ARGS passes options, e.g. BENCH_ARGS=--quick.
.PHONY: bench
BENCH_ARGS  ?=

bench: $(STAMP) ## measure delivery and enqueue vs the raw SMTP limit and Celery (bench/results/)
	$(BIN)/python -m bench $(BENCH_ARGS)
