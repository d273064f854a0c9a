"""The vault itself: archives, keys, users, sessions and the audit log.

Plain blocking Python with no Twisted import, safe from any thread; the daemon
runs it in its worker pool.  L{securevault.storage} is its front door.
"""
