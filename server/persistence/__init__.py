"""Persistence: models, the database by URL, failures, the unit of work, migrations."""
