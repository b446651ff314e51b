"""peewee-migrate migrations; each declares frozen copies of the models it touches."""

from pathlib import Path

MIGRATIONS_DIR = Path(__file__).resolve().parent
