"""`make bench` (`python -m tests.bench`): delivery and enqueue against the raw limit and Celery, in one run.

The file list is the map: ``stack`` starts and stops every process, ``seed`` fills PostgreSQL fast,
``mailbox`` watches the SMTP sink, ``load`` is the HTTP load generator, ``delivery``/``api``/``scale``
are the scenarios, ``peer_celery`` is the Flask + Celery app we compare with, ``report`` writes the
results, and ``cli`` is the command.
"""

# The scenarios of a run, in order, and the titles their rows carry in the report.
SCENARIOS = ("raw", "mailq", "celery", "api", "latency", "scale")
TITLES = {
    "raw": "1. Raw limit",
    "mailq": "2. mailq delivery",
    "celery": "3. Celery + Redis",
    "api": "4. Enqueue API",
    "latency": "5. End-to-end latency",
    "scale": "6. Scale",
}
