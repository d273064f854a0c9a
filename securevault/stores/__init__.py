"""Where the vault keeps things, behind two narrow Protocols.

L{securevault.stores.metadata} (users, sessions, the archive index; SQLite or
PostgreSQL) and L{securevault.stores.blobs} (encrypted archive bodies; a local
directory or S3).  L{securevault.stores.backends} picks them from settings.
"""
