"""Tests for L{securevault.core}."""
