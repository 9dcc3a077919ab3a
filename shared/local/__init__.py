"""The one-machine stack (`mailq dev`, `mailq sink`): embedded PostgreSQL and Redis (embedded), the
SMTP sink (sink). Needs the `local` extra; the cluster image leaves this package out (.dockerignore)."""
