"""The daemon's HTTP side: Options and makeService, the site and its request
pipeline, mutual TLS, the worker pool, streaming and metrics.

Everything that imports Twisted lives here or in L{securevault.resources}.
"""
