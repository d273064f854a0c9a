"""The twistd plugin: `twistd -n securevault`.

Names its module by string, so securevault is imported only when used.
"""

from twisted.application.service import ServiceMaker

securevault = ServiceMaker(
    "securevault",
    "securevault.server.tap",
    "An encrypted file vault served over mutual TLS.",
    "securevault",
)
