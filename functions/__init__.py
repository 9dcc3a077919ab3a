"""Entry points: HTTP functions (main.py), the CLI (cli.py), the dev server (devserver.py)."""
