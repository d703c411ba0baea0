"""Shared fixtures: the registry's (a migrated MLflow SQLite template copied per test, a real `mlflow server`) are
defined in tests/conftest_registry.py and offered to every test module from here."""

pytest_plugins = ["tests.conftest_registry"]
