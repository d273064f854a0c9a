"""Helpers shared by the tests: temp dirs, certificates, fakes."""
