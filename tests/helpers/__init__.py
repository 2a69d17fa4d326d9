"""Shared test code: reference models, datasets, the GCS emulator. The fixtures are registered in conftest.py."""
