"""Backends: one module per kind, each behind ``backends.base.Backend``."""
