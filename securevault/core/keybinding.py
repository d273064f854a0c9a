# -*- test-case-name: tests.core.test_keybinding -*-
"""The master key bound to its vault, and where the key file lives.

A vault started with the wrong key file (a typo in C{--master-key}, a key
left behind on another machine) used to get a brand-new key: its archives
vanished from listings and new uploads went under a key nobody would keep.
So the metadata store holds a I{key check}: per master key id, an HMAC of
the id under a key derived (HKDF) from that master key.  It proves which
keys open the vault without revealing them, and every daemon and admin
command compares the key file against it before anything else runs.

Plain blocking code with no Twisted import (run before the daemon serves).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from securevault.core.archive import META_SUFFIX, context_bytes
from securevault.core.keys import KeyFileError, Keyring, KeyringFile, UnwrapError
from securevault.stores.metadata import MetadataStore

MASTER_KEY_NAME = "master.key"
# The key directory of a data directory NAME-data (or NAME) is NAME-keys.
KEYS_DIR_SUFFIX = "-keys"
DATA_DIR_SUFFIX = "-data"
KEYS_DIR_MODE = 0o700
# The metadata store's named state holding the key check.
KEY_CHECK_STATE = "master_key_check"
KEY_CHECK_FORMAT = "securevault-key-check"
_CHECK_LABEL = b"securevault/v1/key-check"
# How many archive rows a vault from before key checks is tested against:
# one that unwraps proves the key (a wrong key unwraps none).
SAMPLE_ARCHIVES = 3
# What a vault from before the metadata store kept in its data directory
# (see securevault.admin.migration): it holds data too.
LEGACY_USERS_FILE = "users.json"


class KeyBindingError(KeyFileError):
    """The key file does not open this vault, or is missing for a vault that
    holds data; the message is one line naming the path."""


# -- where the key file is ----------------------------------------------------


def default_key_dir(data_dir: Path) -> Path:
    """The directory of a data directory's master key: its sibling named
    after it, C{vault-data} → C{vault-keys}, C{/srv/vault} → C{/srv/vault-keys}.

    Outside the data directory, so that a copy of the data is not a copy of
    the key; named after it, so that two vaults side by side never share one.
    """
    absolute = Path(os.path.abspath(data_dir))
    name = absolute.name
    stem = name[: -len(DATA_DIR_SUFFIX)] if name.endswith(DATA_DIR_SUFFIX) and name != DATA_DIR_SUFFIX else name
    key_dir_name = (stem or "vault") + KEYS_DIR_SUFFIX
    if Path(data_dir).is_absolute() or name != Path(data_dir).name:
        return absolute.parent / key_dir_name
    return Path(data_dir).parent / key_dir_name  # relative stays relative


def default_master_key(data_dir: Path) -> Path:
    """C{--master-key}'s default: C{<key dir>/master.key} (L{default_key_dir})."""
    return default_key_dir(data_dir) / MASTER_KEY_NAME


def legacy_master_key(data_dir: Path) -> Path:
    """Where the master key was by default before: inside the data directory."""
    return Path(data_dir) / MASTER_KEY_NAME


@dataclass(frozen=True)
class KeyLocation:
    """The master key file a command uses, and why there."""

    path: Path
    given: bool  # named by --master-key
    inside_data_dir: bool

    def warning(self, data_dir: Path) -> str | None:
        """The start-up warning for a key kept inside the data directory."""
        if not self.inside_data_dir:
            return None
        advice = f"move it to {default_master_key(data_dir)}"
        if self.given:
            advice += " and point --master-key there (or drop the option)"
        return (
            f"the master key {self.path} is inside the data directory {data_dir}: "
            f"a backup of the data is a backup of the key; {advice}, and back it up separately"
        )


def _inside(path: Path, directory: Path) -> bool:
    return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(directory))


def locate_master_key(data_dir: Path, given: Path | str | None) -> KeyLocation:
    """The key file: C{given}, else L{default_master_key}, else (an existing
    vault from before) the old default inside the data directory when only
    that one exists."""
    if given:
        path = Path(given)
    else:
        path = default_master_key(data_dir)
        legacy = legacy_master_key(data_dir)
        if not path.exists() and legacy.exists():
            path = legacy
    return KeyLocation(path, bool(given), _inside(path, data_dir))


# -- the key check --------------------------------------------------------------


def key_tag(key_id: str, key: bytes) -> str:
    """HMAC-SHA256 of the key id under a key derived from the master key:
    the same master key always gives the same tag; the tag gives nothing
    of the key away."""
    check_key = HKDF(hashes.SHA256(), 32, salt=None, info=_CHECK_LABEL).derive(key)
    return hmac.new(check_key, _CHECK_LABEL + b"\x00" + key_id.encode("utf-8"), hashlib.sha256).hexdigest()


def key_check(keyring: Keyring) -> str:
    """The key check of every key in C{keyring}, as stored in the vault."""
    tags = {key_id: key_tag(key_id, key) for key_id, key in sorted(keyring.keys.items())}
    return json.dumps({"format": KEY_CHECK_FORMAT, "version": 1, "keys": tags}, sort_keys=True)


def _check_tags(check: str) -> dict[str, str]:
    try:
        document = json.loads(check)
        if document["format"] != KEY_CHECK_FORMAT or document["version"] != 1:
            raise ValueError("unknown format")
        tags = {str(key_id): str(tag) for key_id, tag in document["keys"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise KeyBindingError(f"the vault's master key check is malformed ({error}); it was not changed") from None
    return tags


def keyring_opens(keyring: Keyring, check: str) -> bool:
    """Whether C{keyring} is a keyring of the vault whose key check this is:
    at least one of its keys is vouched for, and none of its ids carries a
    different key.  (During a rotation the keyring may hold a key the check
    does not name yet, or no longer: each step keeps one key in common.)"""
    tags = _check_tags(check)
    common = [key_id for key_id in keyring.keys if key_id in tags]
    matches = [hmac.compare_digest(tags[key_id], key_tag(key_id, keyring.keys[key_id])) for key_id in common]
    return bool(matches) and all(matches)


# -- what a vault holds ---------------------------------------------------------


def _legacy_meta_files(data_dir: Path) -> Iterator[Path]:
    archives = data_dir / "archives"
    if archives.is_dir():
        yield from archives.glob(f"*/*{META_SUFFIX}")


def holds_data(metadata: MetadataStore, data_dir: Path | None = None) -> bool:
    """Whether the vault has users, archives or a key check (in the store,
    or in the files of a vault from before the store)."""
    if metadata.get_state(KEY_CHECK_STATE) is not None or metadata.list_users() or metadata.owners():
        return True
    if data_dir is None:
        return False
    return (data_dir / LEGACY_USERS_FILE).exists() or next(_legacy_meta_files(data_dir), None) is not None


def _sample_archives(metadata: MetadataStore, data_dir: Path | None) -> Iterator[tuple[str, str, str]]:
    """(owner id, archive id, sealed document) of a few archives."""
    count = 0
    for owner_id in metadata.owners():
        for record in metadata.list_archives(owner_id):
            yield record.owner_id, record.archive_id, record.document
            count += 1
            if count >= SAMPLE_ARCHIVES:
                return
    if data_dir is not None:
        for path in _legacy_meta_files(data_dir):
            try:
                yield path.parent.name, path.name[: -len(META_SUFFIX)], path.read_text("ascii")
            except (OSError, ValueError):
                continue
            count += 1
            if count >= SAMPLE_ARCHIVES:
                return


def _unwraps(keyring: Keyring, owner_id: str, archive_id: str, document: str) -> bool:
    """Whether C{keyring} unwraps the data key of this archive document."""
    try:
        fields = json.loads(document)
        wrapped = base64.b64decode(fields["wrapped_key"], validate=True)
        keyring.unwrap(str(fields["key_id"]), wrapped, context_bytes(b"data-key", owner_id, archive_id))
    except (UnwrapError, ValueError, KeyError, TypeError, binascii.Error):
        return False
    return True


def _wrong_key(path: Path) -> KeyBindingError:
    return KeyBindingError(
        f"the master key at {path} does not open this vault; give the vault's own key file with --master-key"
    )


def bind_keyring(keyring: Keyring, metadata: MetadataStore, path: Path, data_dir: Path | None = None) -> bool:
    """Check C{keyring} (loaded from C{path}) against the vault's key check.

    A vault without a check (new, or from before checks) gets one, once
    the key is known to be its own: it unwraps one of a few archives' data
    keys, or the vault has no archive to try.  Returns whether the check was
    written now; raises L{KeyBindingError} when the key does not open the
    vault.
    """
    check = metadata.get_state(KEY_CHECK_STATE)
    written = False
    if check is None:
        samples = list(_sample_archives(metadata, data_dir))
        if samples and not any(_unwraps(keyring, *sample) for sample in samples):
            raise _wrong_key(path)
        # Another process may bind at the same moment: the first check stays.
        check = metadata.add_state(KEY_CHECK_STATE, key_check(keyring))
        written = check == key_check(keyring)
    if not keyring_opens(keyring, check):
        raise _wrong_key(path)
    return written


@dataclass(frozen=True)
class MasterKey:
    """The keyring a command runs with, and what opening it did."""

    keyring: Keyring
    created: bool  # a new key file was made (a new, empty vault)
    bound: bool  # the key check was stored now (a new vault, or one from before checks)


def open_master_key(
    key_file: KeyringFile,
    metadata: MetadataStore,
    data_dir: Path | None = None,
    *,
    create: bool,
    how_to_create: str = "",
    passphrase: Callable[[], str | None] | None = None,
) -> MasterKey:
    """The vault's keyring from C{key_file}, checked against the vault.

    A missing key file is created (mode 0600, in a 0700 directory) only for
    a vault that holds nothing yet, and only with C{create}; otherwise the
    refusal says the key is missing (C{how_to_create} is added when the
    vault is empty).  A new key is sealed when C{passphrase} (asked only
    then) gives one.  Never creates a key for an existing vault.
    """
    path = key_file.path
    if not path.exists():
        if holds_data(metadata, data_dir):
            raise KeyBindingError(
                f"the master key file {path} is missing, and this vault holds users or archives: "
                "restore that file from its backup (or give its place with --master-key); no new key was created"
            )
        if not create:
            raise KeyBindingError(f"the master key file {path} does not exist{how_to_create}")
        if not path.parent.exists():
            path.parent.mkdir(parents=True, mode=KEYS_DIR_MODE)
            os.chmod(path.parent, KEYS_DIR_MODE)  # mkdir's mode is filtered by the umask
        keyring = key_file.create(passphrase() if passphrase is not None else None)
        check = metadata.add_state(KEY_CHECK_STATE, key_check(keyring))
        if not keyring_opens(keyring, check):
            # Another process bound its own new key first: this one is useless.
            path.unlink(missing_ok=True)
            raise _wrong_key(path)
        return MasterKey(keyring, created=True, bound=True)
    keyring = key_file.load()
    bound = bind_keyring(keyring, metadata, path, data_dir)
    return MasterKey(keyring, created=False, bound=bound)


def rebind(metadata: MetadataStore, keyring: Keyring) -> None:
    """Record that exactly C{keyring}'s keys open the vault (key rotation:
    after adding a key, and before retiring the old ones)."""
    metadata.set_state(KEY_CHECK_STATE, key_check(keyring))
