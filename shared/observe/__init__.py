"""Observability: the queue gauges the metrics function and `mailq status` compute from indexed
queries (gauges). What each worker counts is shared.metrics, below every room that runs a worker."""
