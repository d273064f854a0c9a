"""securevault benchmark against nginx (mutual TLS, WebDAV PUT) on loopback.

Run from the repository root: ``python -m bench --quick``.  See bench/README.md.
Not a test: nothing in CI runs it.
"""
