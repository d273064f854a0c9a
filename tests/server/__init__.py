"""Tests for L{securevault.server}."""
