"""Tests for L{securevault.client}."""
