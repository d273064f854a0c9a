"""One twisted.web Resource per endpoint of the HTTP contract (shared/API.md)."""
