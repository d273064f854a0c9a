"""The securevault client: C{securevault-client} (L{securevault.client.cli})
and the Python library it is built on (L{securevault.client.library}), on the
standard library only.

    from securevault.client import VaultClient
"""

from securevault.client.library import *  # noqa: F403 (the library's names are the package's)
from securevault.client.library import __all__  # noqa: F401
