"""mailq's importable core: a base of mechanisms at this level (config, domain, db and models, the Redis
keys and queues, context, workers, ...) under rooms named after their jobs: accounts, tasks, webhooks,
delivery, maintenance, observe; local/ holds the one-machine stack (tests/test_layout.py: the order)."""
