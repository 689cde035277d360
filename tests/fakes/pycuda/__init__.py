"""Fake pycuda for tests (see tests/fakes/README.md)."""
