"""Shared fixtures: the registry's (a migrated MLflow SQLite template copied per test, a real `mlflow server`) are
defined in tests/conftest_registry.py, the shared registry's (PostgreSQL and an `mlflow server` on it) in
tests/conftest_postgres.py, and offered to every test module from here."""

pytest_plugins = ["tests.conftest_registry", "tests.conftest_postgres"]
