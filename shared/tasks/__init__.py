"""Tasks: what a mail may carry (content) and how it is stored (storage), enqueueing one or a batch,
reading and listing them (views), a user's control over one (cancel, reschedule, retry), the
dashboard's figures (stats), and the events each status change writes for webhooks (events)."""
