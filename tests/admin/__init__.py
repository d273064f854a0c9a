"""Tests for L{securevault.admin}."""
