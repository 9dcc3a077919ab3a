"""Webhooks: a user's endpoints and their delivery log (endpoints), one POST to an untrusted receiver
(receiver), the worker that delivers each event (worker), and the deliveries put back when due or
lost (requeue)."""
