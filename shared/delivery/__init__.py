"""Delivery: the consumer hands envelopes to the senders (consumer); a sender takes work fairly
(sender) and makes one attempt per task (attempt) with the mail it builds (message) over a pooled,
guarded SMTP connection (mailer, smtp), saying what a failure means (failures), within a memory
budget for large mails (inflight)."""
