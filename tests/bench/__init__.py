"""`make bench` (`python -m tests.bench`): delivery and enqueue against the raw limit and Celery, in one run.

The file list is the map: ``stack`` starts and stops every process, ``authsink`` is the SMTP server
(requiring AUTH), ``seed`` fills PostgreSQL fast, ``mailbox`` watches the sink, ``load`` is the HTTP
load generator, ``delivery``/``api``/``inbox``/``scale``/``relay`` are the scenarios, ``peer_celery`` is the
Flask + Celery app we compare with, ``report``/``rows`` write the results, and ``cli`` is the command.
"""

# The scenarios of a run, in order, and the titles their rows carry in the report.
SCENARIOS = (
    "raw", "mailq", "celery", "api", "inbox", "batch", "latency", "backlog", "fairness", "scale", "relay",
)  # fmt: skip
TITLES = {
    "raw": "1. Raw limit",
    "mailq": "2. mailq delivery",
    "celery": "3. Celery + Redis",
    "api": "4. Enqueue API",
    "inbox": "5. API to inbox",
    "batch": "6. API to inbox, batches of 100",
    "latency": "7. End-to-end latency",
    "cpu": "8. mailq's own CPU per mail",  # from scenario 2's runs: not a scenario of its own
    "backlog": "9. Cost with the backlog size",
    "fairness": "10. Fairness between tenants",
    "scale": "11. Scale",
    "relay": "12. A relay far away",
}
