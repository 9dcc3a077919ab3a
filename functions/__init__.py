"""Entry points: HTTP functions (main.py), the CLI (cli.py; the local stack's in dev.py), the dev server."""
