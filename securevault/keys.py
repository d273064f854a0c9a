# -*- test-case-name: tests.test_keys -*-
"""The master keyring: the key that wraps every archive's data key.

The file named by C{--master-key} is JSON holding one or more 256-bit keys by
id and which one is current.  Several keys exist only while a rotation runs:
archives name the key id that wraps their data key, so a rerun of an
interrupted rotation knows what is left to do.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from securevault.fsutil import write_atomically

KEY_BYTES = 32
NONCE_BYTES = 12
KEYRING_FORMAT = "securevault-master-key"


class KeyFileError(Exception):
    """The master key file is missing, unreadable or malformed."""


class UnwrapError(Exception):
    """A wrapped data key fails authentication or names an unknown key."""


@dataclass(frozen=True)
class Keyring:
    """Master keys by id; C{current_id} wraps new data keys."""

    current_id: str
    keys: Mapping[str, bytes] = field(repr=False)

    @property
    def current_key(self) -> bytes:
        return self.keys[self.current_id]

    def wrap(self, data_key: bytes, context: bytes) -> tuple[str, bytes]:
        """Encrypt C{data_key} under the current key, bound to C{context}.

        @return: the key id and C{nonce || ciphertext || tag}.
        """
        nonce = os.urandom(NONCE_BYTES)
        sealed = AESGCM(self.current_key).encrypt(nonce, data_key, context)
        return self.current_id, nonce + sealed

    def unwrap(self, key_id: str, wrapped: bytes, context: bytes) -> bytes:
        """Recover a data key wrapped by L{wrap} with the same C{context}."""
        key = self.keys.get(key_id)
        if key is None:
            raise UnwrapError(f"unknown master key id {key_id!r}")
        try:
            return AESGCM(key).decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], context)
        except (InvalidTag, ValueError) as error:
            raise UnwrapError("wrapped data key fails authentication") from error

    def to_json(self) -> bytes:
        document = {
            "format": KEYRING_FORMAT,
            "version": 1,
            "current": self.current_id,
            "keys": {kid: base64.b64encode(k).decode("ascii") for kid, k in self.keys.items()},
        }
        return json.dumps(document, indent=2).encode("utf-8") + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> "Keyring":
        try:
            document = json.loads(data)
            if document.get("format") != KEYRING_FORMAT or document.get("version") != 1:
                raise KeyFileError("not a securevault master key file")
            keys = {
                str(kid): base64.b64decode(value, validate=True)
                for kid, value in document["keys"].items()
            }
            current = str(document["current"])
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error) as error:
            raise KeyFileError(f"malformed master key file: {error}") from error
        if current not in keys or any(len(k) != KEY_BYTES for k in keys.values()):
            raise KeyFileError("malformed master key file: bad key length or current id")
        return cls(current, keys)


def new_key_id() -> str:
    return os.urandom(4).hex()


def generate_keyring() -> Keyring:
    """A keyring holding one fresh random key."""
    key_id = new_key_id()
    return Keyring(key_id, {key_id: os.urandom(KEY_BYTES)})


def load_keyring(path: Path) -> Keyring:
    """Read the keyring at C{path}; L{KeyFileError} says what is wrong."""
    try:
        data = path.read_bytes()
    except FileNotFoundError as error:
        raise KeyFileError(
            f"master key file {path} does not exist; run 'securevault-admin init'"
        ) from error
    except OSError as error:
        raise KeyFileError(f"cannot read master key file {path}: {error.strerror}") from error
    return Keyring.from_json(data)


def save_keyring(path: Path, keyring: Keyring) -> None:
    """Atomically replace the keyring file (mode 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomically(path, keyring.to_json(), mode=0o600)


def ensure_keyring(path: Path) -> tuple[Keyring, bool]:
    """Load the keyring, creating it (mode 0600) when absent.

    @return: the keyring and whether it was created now.
    """
    if path.exists():
        return load_keyring(path), False
    keyring = generate_keyring()
    save_keyring(path, keyring)
    return keyring, True
