"""mailq's importable core: config, domain, db, queue protocol, mailer, auth, crypto, services."""
