"""Tests for L{securevault.stores}."""
