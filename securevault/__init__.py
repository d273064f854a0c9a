"""securevault: an encrypted file vault served over mutual TLS with Twisted."""

__version__ = "0.1.0"
