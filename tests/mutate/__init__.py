"""`make mutate`: curated mutants of the design's invariants, each run against the tests meant to kill it.

``mutants.toml`` is the list, ``run.py`` the runner, ``guard.py`` the pytest plugin that proves each
run imported the mutated scratch copy (not the working tree the editable install points at) and
names the first failing test. Nothing here is imported by the product.
"""
