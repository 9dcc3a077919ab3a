# `make chaos` and `make fuzz`: included by the top-level Makefile. tests/test_chaos.py and
# tests/test_fuzz.py run short versions inside `make test`. CHAOS_ARGS passes options, e.g.
# CHAOS_ARGS='-s sender-kills -n 1000 --keep'; FUZZ_EXAMPLES sets schemathesis examples per operation.
.PHONY: chaos fuzz
CHAOS_ARGS    ?=
FUZZ_EXAMPLES ?= 1000

chaos: $(STAMP) ## fault runs: kill workers, restart Redis and PostgreSQL, flaky, hostile, throttling and absent SMTP relays, a bad network
	$(BIN)/python -m tests.chaos $(CHAOS_ARGS)

fuzz: $(STAMP) ## schemathesis over HTTP against `mailq serve`, FUZZ_EXAMPLES per operation, plus bad input
	MAILQ_FUZZ_LIVE=1 MAILQ_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest tests/test_fuzz.py -p no:cacheprovider $(PYTEST_ARGS)
