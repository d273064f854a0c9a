# -*- test-case-name: tests.core.test_keys -*-
"""Tests for L{securevault.core.keys} (the master keyring, plain and sealed by a
passphrase) and L{securevault.core.passphrase} (where that passphrase comes from),
and for a storage that follows a keyring file rotated by someone else."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from securevault.admin.maintenance import rotate_master_key
from securevault.core.keys import (
    KEY_BYTES,
    KEYRING_FORMAT,
    SEALED_FORMAT,
    KeyFileError,
    Keyring,
    KeyringFile,
    UnwrapError,
    ensure_keyring,
    generate_keyring,
    load_keyring,
)
from securevault.core.passphrase import PassphraseError, passphrase_source
from securevault.storage import SecureFileStorage
from tests.support.testcase import SyncTestCase

REPOSITORY = Path(__file__).resolve().parents[2]
PASSPHRASE = "a long passphrase"
OWNER = "a" * 32
CONTEXT = b"data-key|owner|archive"


class CountingPassphrase:
    """A passphrase source that counts how often it is asked."""

    def __init__(self, passphrase: str = PASSPHRASE) -> None:
        self.passphrase = passphrase
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        return self.passphrase


def key_encodings(keyring: Keyring) -> list[bytes]:
    """Every way a key's bytes could show up in a file: raw, base64, hex."""
    found: list[bytes] = []
    for key in keyring.keys.values():
        found += [key, base64.b64encode(key), key.hex().encode("ascii")]
    return found


class KeyringTests(SyncTestCase):
    """L{Keyring.wrap} and L{Keyring.unwrap}: data keys bound to their context
    and to the master key that wrapped them."""

    def test_round_trip(self) -> None:
        """A data key wrapped under the current key unwraps to the same bytes
        with the same context, and the key id returned is the current one."""
        keyring = generate_keyring()
        data_key = os.urandom(KEY_BYTES)
        key_id, wrapped = keyring.wrap(data_key, CONTEXT)
        self.assertEqual(key_id, keyring.current_id)
        self.assertEqual(keyring.unwrap(key_id, wrapped, CONTEXT), data_key)

    def test_fresh_nonce(self) -> None:
        """Wrapping the same data key twice gives two different blobs (a fresh
        nonce each time), and the blob does not contain the data key."""
        keyring = generate_keyring()
        data_key = os.urandom(KEY_BYTES)
        first = keyring.wrap(data_key, CONTEXT)[1]
        second = keyring.wrap(data_key, CONTEXT)[1]
        self.assertNotEqual(first, second)
        self.assertNotIn(data_key, first)

    def test_wrong_context(self) -> None:
        """A wrapped key moved to another archive (another context) fails
        authentication with L{UnwrapError}."""
        keyring = generate_keyring()
        key_id, wrapped = keyring.wrap(os.urandom(KEY_BYTES), CONTEXT)
        with self.assertRaises(UnwrapError) as caught:
            keyring.unwrap(key_id, wrapped, b"data-key|owner|other-archive")
        self.assertIn("fails authentication", str(caught.exception))

    def test_unknown_key_id(self) -> None:
        """A key id the keyring does not hold is an L{UnwrapError} naming it."""
        keyring = generate_keyring()
        _, wrapped = keyring.wrap(os.urandom(KEY_BYTES), CONTEXT)
        with self.assertRaises(UnwrapError) as caught:
            keyring.unwrap("feedface", wrapped, CONTEXT)
        self.assertIn("feedface", str(caught.exception))

    def test_wrong_key_id(self) -> None:
        """A blob wrapped under one key and presented under another key id the
        keyring does hold fails authentication."""
        old = generate_keyring()
        new = generate_keyring()
        both = Keyring(new.current_id, {**old.keys, **new.keys})
        _, wrapped = old.wrap(os.urandom(KEY_BYTES), CONTEXT)
        with self.assertRaises(UnwrapError):
            both.unwrap(new.current_id, wrapped, CONTEXT)

    def test_old_key_still_unwraps(self) -> None:
        """During a rotation the keyring holds old and new keys: a data key
        wrapped under the old one still unwraps by its id, and new wraps use
        the new current key."""
        old = generate_keyring()
        new = generate_keyring()
        both = Keyring(new.current_id, {**old.keys, **new.keys})
        data_key = os.urandom(KEY_BYTES)
        old_id, wrapped = old.wrap(data_key, CONTEXT)
        self.assertEqual(both.unwrap(old_id, wrapped, CONTEXT), data_key)
        self.assertEqual(both.wrap(data_key, CONTEXT)[0], new.current_id)

    def test_damaged_blob(self) -> None:
        """A truncated or bit-flipped wrapped key is an L{UnwrapError}, never
        another exception."""
        keyring = generate_keyring()
        key_id, wrapped = keyring.wrap(os.urandom(KEY_BYTES), CONTEXT)
        flipped = wrapped[:-1] + bytes([wrapped[-1] ^ 1])
        for damaged in (flipped, wrapped[:20], wrapped[:5], b""):
            with self.assertRaises(UnwrapError):
                keyring.unwrap(key_id, damaged, CONTEXT)

    def test_repr_hides_keys(self) -> None:
        """The repr of a keyring (as it might appear in a log or traceback)
        shows no key bytes."""
        keyring = generate_keyring()
        text = repr(keyring).encode("ascii")
        for encoded in key_encodings(keyring)[1:]:
            self.assertNotIn(encoded, text)


class KeyringJsonTests(SyncTestCase):
    """The plain master key file format: round trip and clear refusals."""

    def test_round_trip(self) -> None:
        """L{Keyring.from_json} of L{Keyring.to_json} is the same keyring,
        including one holding several keys."""
        one = generate_keyring()
        two = Keyring(one.current_id, {**generate_keyring().keys, **one.keys})
        for keyring in (one, two):
            self.assertEqual(Keyring.from_json(keyring.to_json()), keyring)

    def test_document(self) -> None:
        """The file is JSON naming its format, version and current key, with
        each key in base64."""
        keyring = generate_keyring()
        document = json.loads(keyring.to_json())
        self.assertEqual(
            document,
            {
                "format": KEYRING_FORMAT,
                "version": 1,
                "current": keyring.current_id,
                "keys": {keyring.current_id: base64.b64encode(keyring.current_key).decode("ascii")},
            },
        )

    def test_malformed(self) -> None:
        """Every malformed file is a L{KeyFileError} with a sentence saying
        the file is not a (valid) master key file, never a raw exception."""
        good = json.loads(generate_keyring().to_json())
        current = good["current"]

        def variant(**changes: Any) -> bytes:
            return json.dumps({**good, **changes}).encode("utf-8")

        cases = {
            "empty": b"",
            "not json": b"{not json",
            "not utf-8": b"\xff\xfe",
            "a list": b"[]",
            "null": b"null",
            "other format": variant(format="something-else"),
            "other version": variant(version=2),
            "no keys": json.dumps({k: v for k, v in good.items() if k != "keys"}).encode(),
            "no current": json.dumps({k: v for k, v in good.items() if k != "current"}).encode(),
            "keys a list": variant(keys=["x"]),
            "bad base64": variant(keys={current: "not base64!"}),
            "short key": variant(keys={current: base64.b64encode(b"short").decode()}),
            "unknown current": variant(current="00000000"),
        }
        for name, data in cases.items():
            with self.assertRaises(KeyFileError, msg=name) as caught:
                Keyring.from_json(data)
            message = str(caught.exception)
            self.assertTrue(
                message.startswith(("malformed master key file", "not a securevault master key file")),
                f"{name}: {message}",
            )

    def test_missing_file(self) -> None:
        """Loading a master key file that does not exist says so, naming it,
        and does not advise C{securevault-admin init}: a new key would not
        open an existing vault."""
        path = self.make_dir() / "master.key"
        with self.assertRaises(KeyFileError) as caught:
            load_keyring(path)
        self.assertIn(str(path), str(caught.exception))
        self.assertIn("does not exist", str(caught.exception))
        self.assertNotIn("init", str(caught.exception))


class EnsureKeyringTests(SyncTestCase):
    """L{ensure_keyring}: the daemon's first start creates the key once."""

    def test_creates_private_file(self) -> None:
        """An absent key file is created (with its directory) with mode 0600,
        holding the keyring returned, and reported as created."""
        path = self.make_dir() / "sub" / "master.key"
        keyring, created = ensure_keyring(path)
        self.assertTrue(created)
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        self.assertEqual(load_keyring(path), keyring)
        self.assertEqual(json.loads(path.read_bytes())["format"], KEYRING_FORMAT)

    def test_idempotent(self) -> None:
        """A second call loads the existing key without rewriting the file."""
        path = self.make_dir() / "master.key"
        first, _ = ensure_keyring(path)
        content = path.read_bytes()
        second, created = ensure_keyring(path)
        self.assertFalse(created)
        self.assertEqual(second, first)
        self.assertEqual(path.read_bytes(), content)


class SealedKeyringTests(SyncTestCase):
    """A master key sealed by a passphrase: nothing readable on disk, the
    passphrase asked once, and clear errors."""

    def setUp(self) -> None:
        self.path = self.make_dir() / "master.key"
        self.keyring = KeyringFile(self.path).create(PASSPHRASE)

    def assert_sealed(self, keyring: Keyring) -> None:
        """The file is a sealed document in which no key of C{keyring}
        appears in any encoding."""
        content = self.path.read_bytes()
        self.assertEqual(json.loads(content)["format"], SEALED_FORMAT)
        for encoded in key_encodings(keyring):
            self.assertNotIn(encoded, content)
        self.assertNotIn(keyring.current_id.encode("ascii"), content)
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)

    def test_create_writes_no_key(self) -> None:
        """C{create(passphrase)} writes a 0600 file of format
        C{securevault-sealed-master-key} holding no key bytes (raw, base64 or
        hex) and not even the key id, plus scrypt parameters."""
        self.assert_sealed(self.keyring)
        document = json.loads(self.path.read_bytes())
        self.assertEqual(document["kdf"]["name"], "scrypt")
        self.assertEqual(set(document), {"format", "version", "kdf", "sealed"})

    def test_load_with_passphrase(self) -> None:
        """A new L{KeyringFile} given the passphrase loads the same keyring."""
        key_file = KeyringFile(self.path, lambda: PASSPHRASE)
        self.assertEqual(key_file.load(), self.keyring)
        self.assertTrue(key_file.sealed)

    def test_wrong_passphrase(self) -> None:
        """A wrong passphrase is a L{KeyFileError} saying "wrong passphrase"."""
        with self.assertRaises(KeyFileError) as caught:
            KeyringFile(self.path, lambda: "not the passphrase").load()
        self.assertIn("wrong passphrase", str(caught.exception))

    def test_empty_passphrase(self) -> None:
        """A source that gives an empty passphrase is a L{KeyFileError}."""
        with self.assertRaises(KeyFileError) as caught:
            KeyringFile(self.path, lambda: "").load()
        self.assertIn("empty", str(caught.exception))

    def test_no_passphrase_source(self) -> None:
        """Without a passphrase source a sealed file is refused with a
        message naming the file and C{--master-key-passphrase}."""
        with self.assertRaises(KeyFileError) as caught:
            KeyringFile(self.path).load()
        self.assertIn("--master-key-passphrase", str(caught.exception))
        self.assertIn(str(self.path), str(caught.exception))

    def test_load_keyring_refuses_sealed(self) -> None:
        """L{load_keyring}, which takes no passphrase, fails clearly on a
        sealed file: the message says it is sealed and how to unlock it."""
        with self.assertRaises(KeyFileError) as caught:
            load_keyring(self.path)
        self.assertIn("sealed", str(caught.exception))
        self.assertIn("--master-key-passphrase", str(caught.exception))

    def test_passphrase_asked_once(self) -> None:
        """Across load, save (a rotation) and load again, the passphrase is
        asked for once; the file stays sealed after the save and another
        reader with the passphrase sees the saved keyring."""
        source = CountingPassphrase()
        key_file = KeyringFile(self.path, source)
        key_file.load()
        rotated = generate_keyring()
        key_file.save(rotated)
        self.assertEqual(key_file.load(), rotated)
        self.assertEqual(source.calls, 1)
        self.assert_sealed(rotated)
        self.assertEqual(KeyringFile(self.path, lambda: PASSPHRASE).load(), rotated)

    def test_tampered_blob(self) -> None:
        """A sealed blob with a flipped bit, or a changed salt, is a
        L{KeyFileError} (the AEAD tag or the derived key no longer match)."""
        document = json.loads(self.path.read_bytes())
        blob = bytearray(base64.b64decode(document["sealed"]))
        blob[len(blob) // 2] ^= 0x01
        salt = bytearray(base64.b64decode(document["kdf"]["salt"]))
        salt[0] ^= 0x01
        cases = {
            "flipped blob": {**document, "sealed": base64.b64encode(bytes(blob)).decode()},
            "truncated blob": {**document, "sealed": base64.b64encode(bytes(blob[:10])).decode()},
            "changed salt": {**document, "kdf": {**document["kdf"], "salt": base64.b64encode(bytes(salt)).decode()}},
        }
        for name, tampered in cases.items():
            self.path.write_text(json.dumps(tampered))
            with self.assertRaises(KeyFileError, msg=name) as caught:
                KeyringFile(self.path, lambda: PASSPHRASE).load()
            self.assertIn("wrong passphrase", str(caught.exception), name)

    def test_malformed_sealed_file(self) -> None:
        """A sealed document missing its KDF, salt or blob, or with absurd
        scrypt parameters, is a L{KeyFileError} naming the problem."""
        document = json.loads(self.path.read_bytes())
        kdf = document["kdf"]
        cases = {
            "no kdf": {k: v for k, v in document.items() if k != "kdf"},
            "kdf a list": {**document, "kdf": []},
            "bad salt": {**document, "kdf": {**kdf, "salt": "!!"}},
            "n not a number": {**document, "kdf": {**kdf, "n": "many"}},
            "huge n": {**document, "kdf": {**kdf, "n": 2**40}},
            "no blob": {k: v for k, v in document.items() if k != "sealed"},
            "blob not base64": {**document, "sealed": "***"},
        }
        for name, tampered in cases.items():
            self.path.write_text(json.dumps(tampered))
            with self.assertRaises(KeyFileError, msg=name):
                KeyringFile(self.path, lambda: PASSPHRASE).load()

    def test_unusable_scrypt_parameters(self) -> None:
        """scrypt parameters inside the accepted ranges that hashlib still
        refuses (n not a power of two; a memory bound over INT_MAX) are a
        L{KeyFileError}, like every other damaged file."""
        document = json.loads(self.path.read_bytes())
        for name, changes in {"n=3": {"n": 3}, "n=2**20": {"n": 2**20}}.items():
            self.path.write_text(json.dumps({**document, "kdf": {**document["kdf"], **changes}}))
            with self.assertRaises(KeyFileError, msg=name):
                KeyringFile(self.path, lambda: PASSPHRASE).load()


def run_python(code: str, stdin: str | None) -> subprocess.CompletedProcess[str]:
    """Run C{code} in a fresh interpreter with the repository importable and
    C{stdin} as its standard input (or /dev/null)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPOSITORY), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-c", code],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )


class PassphraseSourceTests(SyncTestCase):
    """L{passphrase_source}: stdin, fd:N, file:PATH, prompt; bad specs refused."""

    def write_file(self, content: bytes) -> Path:
        path = self.make_dir() / "passphrase"
        path.write_bytes(content)
        path.chmod(0o600)
        return path

    def test_file(self) -> None:
        """C{file:PATH} reads the first line of the file, without its line
        ending (LF or CRLF); spaces inside are kept."""
        for content in (b"file secret\n", b"file secret\r\n", b"file secret", b"file secret\nsecond line\n"):
            source = passphrase_source(f"file:{self.write_file(content)}")
            assert source is not None
            self.assertEqual(source(), "file secret", content)

    def test_file_empty(self) -> None:
        """An empty passphrase file (or one starting with a blank line) is a
        L{PassphraseError} naming the file."""
        for content in (b"", b"\n", b"\nsecret\n"):
            path = self.write_file(content)
            source = passphrase_source(f"file:{path}")
            assert source is not None
            with self.assertRaises(PassphraseError) as caught:
                source()
            self.assertIn(str(path), str(caught.exception))

    def test_file_missing(self) -> None:
        """A passphrase file that cannot be read is a L{PassphraseError} with
        the path and the reason, not an OSError."""
        path = self.make_dir() / "absent"
        source = passphrase_source(f"file:{path}")
        assert source is not None
        with self.assertRaises(PassphraseError) as caught:
            source()
        self.assertIn(str(path), str(caught.exception))

    def pipe_with(self, content: bytes) -> int:
        """The read end of a pipe holding C{content}, write end closed; the
        read end is closed in cleanup unless the source closed it."""
        read_fd, write_fd = os.pipe()
        os.write(write_fd, content)
        os.close(write_fd)

        def close() -> None:
            try:
                os.close(read_fd)
            except OSError:
                pass

        self.addCleanup(close)
        return read_fd

    def test_fd(self) -> None:
        """C{fd:N} reads the first line from an inherited descriptor (here a
        pipe) and closes it."""
        read_fd = self.pipe_with(b"pipe secret\nignored\n")
        source = passphrase_source(f"fd:{read_fd}")
        assert source is not None
        self.assertEqual(source(), "pipe secret")
        self.assertRaises(OSError, os.fstat, read_fd)

    def test_fd_empty(self) -> None:
        """A descriptor that gives nothing is a L{PassphraseError} naming it."""
        read_fd = self.pipe_with(b"")
        source = passphrase_source(f"fd:{read_fd}")
        assert source is not None
        with self.assertRaises(PassphraseError) as caught:
            source()
        self.assertIn(f"file descriptor {read_fd}", str(caught.exception))

    def test_bogus_spec(self) -> None:
        """A source that is none of prompt, stdin, fd:N, file:PATH is a
        L{PassphraseError} quoting it and listing the accepted forms."""
        for spec in ("", "env:SECRET", "fd:", "fd:three", "fd:-1", "file:", "Stdin", "secret"):
            with self.assertRaises(PassphraseError, msg=spec) as caught:
                passphrase_source(spec)
            self.assertIn(repr(spec), str(caught.exception))
            self.assertIn("fd:N", str(caught.exception))

    def test_prompt(self) -> None:
        """C{prompt} gives a callable (not called here: it reads a terminal)."""
        self.assertTrue(callable(passphrase_source("prompt")))

    def test_stdin_and_default(self) -> None:
        """In a process whose standard input is a pipe, C{stdin} reads its
        first line without the line ending, an empty stdin is a
        L{PassphraseError}, and no spec at all gives no source (no prompt
        without a terminal)."""
        code = (
            "from securevault.core.passphrase import passphrase_source, PassphraseError\n"
            "print(passphrase_source(None))\n"
            "try:\n"
            "    print(repr(passphrase_source('stdin')()))\n"
            "except PassphraseError as error:\n"
            "    print('error:', error)\n"
        )
        result = run_python(code, "stdin secret\r\nnext\n")
        self.assertEqual(result.stdout, "None\n'stdin secret'\n", result.stderr)
        result = run_python(code, None)
        self.assertEqual(result.stdout, "None\nerror: no passphrase was read from standard input\n", result.stderr)


def meta_key_id(storage: SecureFileStorage, archive_id: str) -> str:
    """The master key id recorded in an archive's index row: in its document
    (which says which key wraps the data key) and, the same, in its
    C{key_id} column."""
    record = storage.metadata.get_archive(OWNER, archive_id)
    assert record is not None
    key_id = str(json.loads(record.document)["key_id"])
    assert record.key_id == key_id, (record.key_id, key_id)
    return key_id


class StorageFollowsKeyFileTests(SyncTestCase):
    """A storage built with C{keyring_file=} follows a rotation done by
    another process (another L{KeyringFile} on the same path)."""

    def check_follows(self, make_file: Callable[[], KeyringFile]) -> None:
        """Store, rotate through a second key file object, then read the old
        archive and store a new one through the first storage."""
        root = self.make_dir()
        daemon_file = make_file()
        storage = SecureFileStorage(root, daemon_file.load(), keyring_file=daemon_file)
        self.addCleanup(storage.metadata.close)
        old_id = storage.keyring.current_id
        content = os.urandom(50_000)
        before = storage.store(OWNER, "before.bin", content)
        self.assertEqual(meta_key_id(storage, before.id), old_id)

        # The rotation opens its own stores on the same data directory, as
        # securevault-admin does beside a running daemon.
        def storage_for(keyring: Keyring) -> SecureFileStorage:
            rotating = SecureFileStorage(root, keyring)
            self.addCleanup(rotating.metadata.close)
            return rotating

        report = rotate_master_key(storage_for, make_file())
        self.assertNotEqual(report.new_key_id, old_id)
        self.assertEqual(report.retired_key_ids, (old_id,))

        self.assertEqual(storage.read_all(OWNER, before.id)[1], content)
        after = storage.store(OWNER, "after.bin", b"after rotation")
        self.assertEqual(meta_key_id(storage, after.id), report.new_key_id)
        self.assertEqual(meta_key_id(storage, before.id), report.new_key_id)
        self.assertEqual([info.id for info in storage.list(OWNER)], [after.id, before.id])
        self.assertEqual(storage.keyring.current_id, report.new_key_id)
        self.assertEqual(set(storage.keyring.keys), {report.new_key_id})

    def test_plain_key_file(self) -> None:
        """With a plain key file: an archive stored before the rotation still
        reads after it, and a new archive is wrapped under the new key id."""
        path = self.make_dir() / "master.key"
        KeyringFile(path).create()
        self.check_follows(lambda: KeyringFile(path))

    def test_sealed_key_file(self) -> None:
        """With a sealed key file the same holds, the file stays sealed, and
        neither side asks for the passphrase more than once."""
        path = self.make_dir() / "master.key"
        KeyringFile(path).create(PASSPHRASE)
        sources: list[CountingPassphrase] = []

        def make_file() -> KeyringFile:
            sources.append(CountingPassphrase())
            return KeyringFile(path, sources[-1])

        self.check_follows(make_file)
        self.assertEqual([source.calls for source in sources], [1, 1])
        self.assertEqual(json.loads(path.read_bytes())["format"], SEALED_FORMAT)
