"""Fault runs: thousands of tasks through real mailq processes while we break things, then an audit.

    stack.py     the processes: embedded PostgreSQL and Redis we can stop, the API, workers, sweep
    smtpd.py     an SMTP server answering DATA at random (250, 451, 550, dropped before/after the dot)
    client.py    a keep-alive HTTP client and the enqueue load (latencies, retries with Idempotency-Key)
    audit.py     what every run ends with: every task terminal, every sent one at the server, none lost
    scenarios.py one function per fault, each returning a Result
    hostile.py   the hostile tenants' SMTP servers (tests/hostile_smtp.py) in one process, each DATA logged
    tenants.py   the "hostile tenants" scenario: a well-behaved tenant beside five hostile ones
    faultproxy.py an asyncio TCP proxy that adds latency, blackholes (no reset) or resets connections
    network.py   the "bad network" scenario: that proxy between the workers and PostgreSQL, Redis, SMTP
    __main__.py  `python -m tests.chaos` (what `make chaos` runs): every scenario, then a Markdown table

`tests/test_chaos.py` runs the same scenarios with hundreds of tasks instead of thousands.
"""
