# -*- test-case-name: tests.core.test_keys -*-
"""The master keyring: the key that wraps every archive's data key.

The file named by C{--master-key} is JSON holding one or more 256-bit keys by
id and which one is current.  Several keys exist only while a rotation runs:
archives name the key id that wraps their data key, so a rerun of an
interrupted rotation knows what is left to do.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from securevault.core.fsutil import write_atomically

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
    def from_json(cls, data: bytes) -> Keyring:
        try:
            document = json.loads(data)
            if document.get("format") != KEYRING_FORMAT or document.get("version") != 1:
                raise KeyFileError("not a securevault master key file")
            keys = {str(kid): base64.b64decode(value, validate=True) for kid, value in document["keys"].items()}
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


PassphraseSource = Callable[[], str]
SEALED_FORMAT = "securevault-sealed-master-key"
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16


@dataclass(frozen=True)
class Seal:
    """A passphrase-derived key-encryption key (scrypt) and its parameters."""

    salt: bytes
    n: int
    r: int
    p: int
    kek: bytes = field(repr=False)

    @classmethod
    def derive(
        cls, passphrase: str, salt: bytes | None = None, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P
    ) -> Seal:
        if not passphrase:
            raise KeyFileError("the master key passphrase is empty")
        if not (2 <= n <= 2**20 and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16):
            raise KeyFileError("the sealed master key file has unreasonable scrypt parameters")
        salt = os.urandom(SALT_BYTES) if salt is None else salt
        try:
            kek = hashlib.scrypt(
                passphrase.encode("utf-8"),
                salt=salt,
                n=n,
                r=r,
                p=p,
                maxmem=min(128 * r * (n + p + 2) + (1 << 20), 2**31 - 1),
                dklen=KEY_BYTES,
            )
        except (ValueError, MemoryError):
            raise KeyFileError("the sealed master key file has unusable scrypt parameters") from None
        return cls(salt, n, r, p, kek)

    def seal(self, keyring: Keyring) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        sealed = AESGCM(self.kek).encrypt(nonce, keyring.to_json(), SEALED_FORMAT.encode("ascii"))
        document = {
            "format": SEALED_FORMAT,
            "version": 1,
            "kdf": {
                "name": "scrypt",
                "n": self.n,
                "r": self.r,
                "p": self.p,
                "salt": base64.b64encode(self.salt).decode("ascii"),
            },
            "sealed": base64.b64encode(nonce + sealed).decode("ascii"),
        }
        return json.dumps(document, indent=2).encode("utf-8") + b"\n"

    def unseal(self, document: dict[str, Any]) -> Keyring:
        try:
            blob = base64.b64decode(document["sealed"], validate=True)
            plain = AESGCM(self.kek).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], SEALED_FORMAT.encode("ascii"))
        except InvalidTag:
            raise KeyFileError("wrong passphrase for the sealed master key (or the file was altered)") from None
        except (KeyError, ValueError, TypeError, binascii.Error) as error:
            raise KeyFileError(f"malformed sealed master key file: {error}") from None
        return Keyring.from_json(plain)


def _sealed_document(data: bytes) -> dict[str, Any] | None:
    try:
        document = json.loads(data)
    except ValueError:
        return None
    if isinstance(document, dict) and document.get("format") == SEALED_FORMAT:
        return document
    return None


def file_is_sealed(path: Path) -> bool:
    """Whether the master key file at C{path} is sealed by a passphrase
    (False when it does not exist or cannot be read: opening it says why)."""
    try:
        return _sealed_document(Path(path).read_bytes()) is not None
    except OSError:
        return False


class KeyringFile:
    """The master key file, plain or sealed by a passphrase.

    The passphrase is asked for once, when a sealed file is first opened;
    the derived key is kept so that reloads and saves (key rotation) need no
    second prompt.  The passphrase itself is not kept.
    """

    def __init__(self, path: Path, passphrase: PassphraseSource | None = None) -> None:
        self.path = Path(path)
        self._passphrase = passphrase
        self._seal: Seal | None = None

    @property
    def sealed(self) -> bool:
        return self._seal is not None

    def _read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError as error:
            # No advice to create one: a new key would not open an existing
            # vault (see securevault.core.keybinding, which says what to do).
            raise KeyFileError(f"the master key file {self.path} does not exist") from error
        except OSError as error:
            raise KeyFileError(f"cannot read master key file {self.path}: {error.strerror}") from error

    def load(self) -> Keyring:
        data = self._read()
        document = _sealed_document(data)
        if document is None:
            return Keyring.from_json(data)
        try:
            kdf = document["kdf"]
            salt = base64.b64decode(kdf["salt"], validate=True)
            params = (int(kdf["n"]), int(kdf["r"]), int(kdf["p"]))
        except (KeyError, ValueError, TypeError, binascii.Error) as error:
            raise KeyFileError(f"malformed sealed master key file: {error}") from None
        seal = self._seal
        if seal is None or seal.salt != salt or (seal.n, seal.r, seal.p) != params:
            if self._passphrase is None:
                raise KeyFileError(
                    f"master key file {self.path} is sealed; give its passphrase "
                    "(--master-key-passphrase prompt|stdin|fd:N|file:PATH)"
                )
            seal = Seal.derive(self._passphrase(), salt, *params)
        keyring = seal.unseal(document)
        self._seal = seal
        return keyring

    def save(self, keyring: Keyring) -> None:
        """Atomically replace the file, sealed again when it was sealed."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = self._seal.seal(keyring) if self._seal is not None else keyring.to_json()
        write_atomically(self.path, data, mode=0o600)

    def create(self, passphrase: str | None = None) -> Keyring:
        """Write a new keyring (sealed when a passphrase is given)."""
        if passphrase is not None:
            self._seal = Seal.derive(passphrase)
        keyring = generate_keyring()
        self.save(keyring)
        return keyring


def load_keyring(path: Path) -> Keyring:
    """Read a plain keyring file; L{KeyFileError} says what is wrong."""
    return KeyringFile(path).load()


def save_keyring(path: Path, keyring: Keyring) -> None:
    """Atomically replace a plain keyring file (mode 0600)."""
    KeyringFile(path).save(keyring)


def ensure_keyring(path: Path) -> tuple[Keyring, bool]:
    """Load the keyring, creating a plain one (mode 0600) when absent.

    @return: the keyring and whether it was created now.
    """
    if path.exists():
        return load_keyring(path), False
    return KeyringFile(path).create(), True
