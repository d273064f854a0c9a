# -*- test-case-name: tests.core.test_integrity -*-
"""What grants access is authenticated under the master key.

Anyone who can write the metadata store could otherwise log in as anyone
(replace a password hash), or mint a session (insert the digest of an id
they chose).  So every user row and session row carries an HMAC of the
fields that grant access, and a row whose HMAC fails is refused, never
obeyed; the audit chain is keyed the same way (L{securevault.core.audit}).

The MAC keys derive (HKDF-SHA256, one purpose each) from the vault's
I{integrity key}: 32 random bytes made once per vault, kept in the store's
named state wrapped (AES-GCM) under the current master key.  Only a holder
of the master key can read it; a key rotation rewraps it under the new
master key (one write), so no row needs to be MACed again and the audit
chain stays verifiable across rotations.

Plain blocking code with no Twisted import.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from securevault.core.keys import KEY_BYTES, KeyFileError, Keyring, UnwrapError
from securevault.stores.metadata import MetadataStore, SessionRecord, UserRecord

# Named state: the integrity key, wrapped under the current master key.
INTEGRITY_KEY_STATE = "integrity_key"
INTEGRITY_KEY_FORMAT = "securevault-integrity-key"
_WRAP_CONTEXT = b"securevault/v1/integrity-key"
# Named state: existing rows were MACed once (a vault from before row MACs);
# from then on a row without a MAC is refused.
ROW_MACS_STATE = "row_macs"
# Hex digits of a keyed digest of a name that is not a user's.
NAME_DIGEST_CHARS = 16

# Called with ("user" | "session", user id) when a row fails authentication.
RefusalHook = Callable[[str, str], None]


class IntegrityKeyError(KeyFileError):
    """The vault's integrity key cannot be unwrapped with this keyring."""


def derive(secret: bytes, purpose: str) -> bytes:
    """A 32-byte key for one C{purpose}, derived (HKDF-SHA256) from C{secret}:
    keys for different purposes are independent."""
    info = b"securevault/v1/" + purpose.encode("ascii")
    return HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(secret)


def audit_chain_key(integrity: bytes) -> bytes:
    """The key of the audit log's chain (L{securevault.core.audit}), derived
    from the vault's integrity key, so it survives master key rotations."""
    return derive(integrity, "audit-chain")


def _wrapped_document(keyring: Keyring, key: bytes) -> str:
    key_id, wrapped = keyring.wrap(key, _WRAP_CONTEXT)
    return json.dumps(
        {
            "format": INTEGRITY_KEY_FORMAT,
            "version": 1,
            "key_id": key_id,
            "wrapped": base64.b64encode(wrapped).decode("ascii"),
        },
        sort_keys=True,
    )


def _unwrap_document(keyring: Keyring, document: str) -> tuple[str, bytes]:
    """(master key id, integrity key) of a stored document."""
    try:
        fields = json.loads(document)
        if fields["format"] != INTEGRITY_KEY_FORMAT or fields["version"] != 1:
            raise ValueError("unknown format")
        key_id = str(fields["key_id"])
        key = keyring.unwrap(key_id, base64.b64decode(fields["wrapped"], validate=True), _WRAP_CONTEXT)
    except UnwrapError as error:
        raise IntegrityKeyError(f"the vault's integrity key cannot be unwrapped: {error}") from None
    except (ValueError, KeyError, TypeError, binascii.Error) as error:
        raise IntegrityKeyError(f"the vault's integrity key is malformed ({error})") from None
    if len(key) != KEY_BYTES:
        raise IntegrityKeyError("the vault's integrity key has the wrong length")
    return key_id, key


def integrity_key(keyring: Keyring, metadata: MetadataStore) -> bytes:
    """The vault's integrity key, made (and stored wrapped) on first use.

    Processes starting at once agree on the first key stored.  Call only
    after the keyring was checked against the vault
    (L{securevault.core.keybinding.open_master_key})."""
    document = metadata.get_state(INTEGRITY_KEY_STATE)
    if document is None:
        # A vault that had one lost it (a store edited or restored wrongly):
        # a new key would adopt rows nobody authenticated.  Refused.
        if metadata.get_state(ROW_MACS_STATE) is not None or any(
            record.mac is not None for record in metadata.list_users()
        ):
            raise IntegrityKeyError(
                "the vault's integrity key is missing from its metadata store, but its rows were "
                "authenticated with one: restore the metadata store from a backup"
            )
        document = metadata.add_state(INTEGRITY_KEY_STATE, _wrapped_document(keyring, os.urandom(KEY_BYTES)))
    return _unwrap_document(keyring, document)[1]


def rewrap_integrity_key(keyring: Keyring, metadata: MetadataStore) -> bool:
    """Wrap the integrity key under C{keyring}'s current key (key rotation,
    while the keyring still holds the old key too); safe to rerun.  Returns
    whether it was rewrapped now."""
    document = metadata.get_state(INTEGRITY_KEY_STATE)
    if document is None:
        integrity_key(keyring, metadata)
        return True
    key_id, key = _unwrap_document(keyring, document)
    if key_id == keyring.current_id:
        return False
    metadata.set_state(INTEGRITY_KEY_STATE, _wrapped_document(keyring, key))
    return True


def _canonical(*fields: object) -> bytes:
    return json.dumps(fields, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _time(value: float) -> str:
    # Exact and engine-independent: the float the store gives back.
    return float(value).hex()


@dataclass
class RowAuthenticator:
    """MACs of the rows that grant access, under keys derived from the
    vault's integrity key (see docs/FORMAT.md, "Row MACs").

    A user row's MAC covers its name, id and password hash; a session
    row's covers its digest, user name, user id, certificate fingerprint,
    creation and absolute expiry.  Not its last use: that changes often,
    and moving it only moves the idle timeout, which the absolute expiry
    (covered) still bounds.
    """

    key: bytes = field(repr=False)
    on_refused: RefusalHook | None = None
    refused: int = 0

    def __post_init__(self) -> None:
        self._row_key = derive(self.key, "row-mac")
        self._name_key = derive(self.key, "user-name-digest")

    def _mac(self, message: bytes) -> str:
        return hmac.new(self._row_key, message, hashlib.sha256).hexdigest()

    def user_mac(self, name: str, user_id: str, password_hash: str) -> str:
        return self._mac(_canonical("user", name, user_id, password_hash))

    def session_mac(self, record: SessionRecord) -> str:
        return self._mac(
            _canonical(
                "session",
                record.digest,
                record.username,
                record.user_id,
                record.fingerprint,
                _time(record.created_at),
                _time(record.expires_at),
            )
        )

    def _refuse(self, kind: str, user_id: str) -> bool:
        self.refused += 1
        if self.on_refused is not None:
            self.on_refused(kind, user_id)
        return False

    def user_ok(self, record: UserRecord) -> bool:
        """Whether the row is as securevault wrote it (else reported)."""
        expected = self.user_mac(record.name, record.user_id, record.password_hash)
        if record.mac is not None and hmac.compare_digest(record.mac, expected):
            return True
        return self._refuse("user", record.user_id)

    def session_ok(self, record: SessionRecord) -> bool:
        """Whether the row is as securevault wrote it (else reported)."""
        if record.mac is not None and hmac.compare_digest(record.mac, self.session_mac(record)):
            return True
        return self._refuse("session", record.user_id)

    def name_digest(self, name: str) -> str:
        """What logs record for a name that is no user's: a short keyed
        digest, equal for equal names (an operator can correlate attempts)
        and useless without the master key (a password typed as a name
        cannot be read back, nor guessed offline)."""
        message = name.encode("utf-8", "surrogatepass")
        return hmac.new(self._name_key, message, hashlib.sha256).hexdigest()[:NAME_DIGEST_CHARS]


def authenticate_existing_rows(metadata: MetadataStore, rows: RowAuthenticator) -> tuple[int, int] | None:
    """Once per vault (a vault from before row MACs): MAC every user row that
    has none, and end every session that has none (their users log in
    again).  Recorded in the store's named state; after that a row without
    a MAC is refused.  Returns (users MACed, sessions ended) when done now,
    None when done before.  Safe to run from several processes at once."""
    if metadata.get_state(ROW_MACS_STATE) is not None:
        return None
    users = 0
    for record in metadata.list_users():
        if record.mac is None:
            mac = rows.user_mac(record.name, record.user_id, record.password_hash)
            users += metadata.set_user_mac(record, mac)
    sessions = metadata.delete_unauthenticated_sessions()
    metadata.add_state(ROW_MACS_STATE, "1")
    return users, sessions


def open_rows(keyring: Keyring, metadata: MetadataStore) -> tuple[RowAuthenticator, tuple[int, int] | None]:
    """The vault's L{RowAuthenticator}, after L{authenticate_existing_rows}."""
    rows = RowAuthenticator(integrity_key(keyring, metadata))
    return rows, authenticate_existing_rows(metadata, rows)
