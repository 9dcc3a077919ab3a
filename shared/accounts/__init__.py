"""Accounts: passwords and tokens (auth), and the user's own record: register, log in, read and change
it, rotate the stored secrets' keys, health (users)."""
