"""securevault: an encrypted file vault served over mutual TLS with Twisted.

The package is laid out by role:

  - L{securevault.server}: the daemon's HTTP side (the twistd plugin's
    composition root, the site, TLS, the worker pool, metrics);
  - L{securevault.resources}: one twisted.web Resource per endpoint;
  - L{securevault.storage} and L{securevault.core}: the vault itself, plain
    blocking Python with no Twisted import (archives, keys, users, sessions,
    the audit log);
  - L{securevault.stores}: the metadata and blob stores behind their Protocols;
  - L{securevault.admin}: C{securevault-admin} and the operator's tools;
  - L{securevault.client}: C{securevault-client} and the Python library.
"""

__version__ = "0.1.0"
