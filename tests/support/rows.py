# -*- test-case-name: tests.core.test_integrity -*-
"""The row authenticator of a test's vault (see securevault.core.integrity)."""

from __future__ import annotations

from securevault.core.integrity import RowAuthenticator, open_rows
from securevault.core.keys import Keyring, generate_keyring
from securevault.stores.metadata import MetadataStore

# A keyring for stores no daemon or admin command opens with a key file.
TEST_KEYRING = generate_keyring()


def vault_rows(metadata: MetadataStore, keyring: Keyring | None = None) -> RowAuthenticator:
    """The vault's L{RowAuthenticator}, as the daemon opens it: its integrity
    key unwrapped (made on first use) with C{keyring}, else L{TEST_KEYRING}."""
    return open_rows(keyring if keyring is not None else TEST_KEYRING, metadata)[0]


# An audit chain key for logs no vault's daemon or admin command reads.
TEST_AUDIT_KEY = bytes(range(32))
