"""The contract every metadata store and every blob store must keep.

Each backend's test module subclasses these mixins with a C{make_store()}
that returns a fresh, empty store, so SQLite, PostgreSQL, the local
directory and S3 are held to one and the same suite.
"""

from __future__ import annotations

import os
import threading
import time

from securevault.stores.blobs import BlobNotFound, BlobStore
from securevault.stores.metadata import (
    SESSIONS_REVOKED_STATE,
    ArchiveRecord,
    DuplicateUser,
    LoginAttempt,
    MetadataStore,
    OverQuota,
    SessionRecord,
    UploadConflict,
    UploadGone,
    UploadPiece,
    UploadRecord,
    UserRecord,
)


def _archive(owner: str, archive_id: str, created_ns: int, stored: int = 100, key_id: str = "k1") -> ArchiveRecord:
    return ArchiveRecord(owner, archive_id, created_ns, stored, key_id, f'{{"doc": "{archive_id}"}}')


def _session(
    digest: str, user_id: str = "u1", *, last_used: float = 100.0, expires_at: float = 1000.0
) -> SessionRecord:
    return SessionRecord(digest, "alice", user_id, "f" * 64, 100.0, last_used, expires_at)


def _attempt(number: int, at: float, *, certificate: str = "c" * 64, account: str = "a" * 64) -> LoginAttempt:
    return LoginAttempt(f"attempt-{number}", certificate, account, at)


def _upload(upload_id: str, owner: str = "u1", length: int = 100, reserved: int = 200) -> UploadRecord:
    return UploadRecord(upload_id, owner, length, 0, reserved, 1000.0, "k1", '{"doc": 1}')


class MetadataStoreContract:
    """Mixed into a trial TestCase; C{make_store} returns a fresh store."""

    # resumable uploads

    def test_upload_pieces_move_the_offset(self) -> None:
        """A piece is recorded only at the upload's offset, within its
        length; it moves the offset and the expiry in one step."""
        store = self._store()
        store.put_upload(_upload("a" * 32))
        self.assertIsNone(store.get_upload("u2", "a" * 32))  # type: ignore[attr-defined]
        self.assertEqual(store.add_upload_piece("u1", UploadPiece("a" * 32, 0, 60, "b" * 32), 2000.0), 60)  # type: ignore[attr-defined]
        self.assertRaises(UploadConflict, store.add_upload_piece, "u1", UploadPiece("a" * 32, 0, 10, "c" * 32), 1.0)  # type: ignore[attr-defined]
        self.assertRaises(UploadConflict, store.add_upload_piece, "u1", UploadPiece("a" * 32, 60, 41, "c" * 32), 1.0)  # type: ignore[attr-defined]
        self.assertRaises(UploadGone, store.add_upload_piece, "u2", UploadPiece("a" * 32, 60, 1, "c" * 32), 1.0)  # type: ignore[attr-defined]
        record = store.get_upload("u1", "a" * 32)
        assert record is not None
        self.assertEqual((record.upload_offset, record.expires_at), (60, 2000.0))  # type: ignore[attr-defined]
        self.assertEqual(store.list_upload_pieces("a" * 32), [UploadPiece("a" * 32, 0, 60, "b" * 32)])  # type: ignore[attr-defined]
        self.assertEqual(store.all_upload_blob_ids(), {("u1", "b" * 32)})  # type: ignore[attr-defined]
        self.assertEqual(store.expired_uploads(1999.0), [])  # type: ignore[attr-defined]
        self.assertEqual(store.expired_uploads(2000.0), [("u1", "a" * 32)])  # type: ignore[attr-defined]
        self.assertIsNone(store.delete_upload("u2", "a" * 32))  # type: ignore[attr-defined]
        self.assertEqual(store.delete_upload("u1", "a" * 32), [UploadPiece("a" * 32, 0, 60, "b" * 32)])  # type: ignore[attr-defined]
        self.assertEqual(store.all_upload_blob_ids(), set())  # type: ignore[attr-defined]

    def test_reservations_count_against_the_quota(self) -> None:
        """Uploads reserve quota; archives and uploads share it; finishing
        an upload swaps its reservation for its archive atomically."""
        store = self._store()
        store.put_archive(_archive("u1", "1" * 32, 1, stored=300), 1000)
        store.put_upload(_upload("a" * 32, reserved=500), 1000)
        self.assertEqual(store.reserved("u1"), 500)  # type: ignore[attr-defined]
        self.assertRaises(OverQuota, store.put_upload, _upload("b" * 32, reserved=201), 1000)  # type: ignore[attr-defined]
        self.assertRaises(OverQuota, store.put_archive, _archive("u1", "2" * 32, 2, stored=201), 1000)  # type: ignore[attr-defined]
        store.put_upload(_upload("c" * 32, owner="u2", reserved=900), 1000)  # another owner's own quota
        store.put_archive(_archive("u1", "3" * 32, 3, stored=600), 1000, "a" * 32)
        self.assertEqual((store.reserved("u1"), store.usage("u1")), (0, 900))  # type: ignore[attr-defined]
        self.assertIsNone(store.get_upload("u1", "a" * 32))  # type: ignore[attr-defined]
        self.assertRaises(UploadGone, store.put_archive, _archive("u1", "4" * 32, 4, stored=1), 1000, "a" * 32)  # type: ignore[attr-defined]
        self.assertIsNone(store.get_archive("u1", "4" * 32))  # type: ignore[attr-defined]

    def make_store(self) -> MetadataStore:
        raise NotImplementedError

    def _store(self) -> MetadataStore:
        store = self.make_store()
        self.addCleanup(store.close)  # type: ignore[attr-defined]
        return store

    # users

    def test_user_round_trip(self) -> None:
        store = self._store()
        record = UserRecord("alice", "a" * 32, "scrypt$hash", "2026-11-24T00:00:00Z")
        store.add_user(record)
        self.assertEqual(store.get_user("alice"), record)  # type: ignore[attr-defined]
        self.assertIsNone(store.get_user("bob"))  # type: ignore[attr-defined]
        self.assertIsNone(store.get_user("ALICE"))  # type: ignore[attr-defined]

    def test_duplicate_user_refused(self) -> None:
        store = self._store()
        store.add_user(UserRecord("alice", "a" * 32, "h1", "t"))
        self.assertRaises(DuplicateUser, store.add_user, UserRecord("alice", "b" * 32, "h2", "t"))  # type: ignore[attr-defined]
        self.assertEqual(store.get_user("alice").password_hash, "h1")  # type: ignore[attr-defined,union-attr]

    def test_set_password_and_list(self) -> None:
        store = self._store()
        store.add_user(UserRecord("bob", "b" * 32, "h1", "t"))
        store.add_user(UserRecord("alice", "a" * 32, "h1", "t"))
        self.assertTrue(store.set_password_hash("bob", "h2"))  # type: ignore[attr-defined]
        self.assertFalse(store.set_password_hash("carol", "h2"))  # type: ignore[attr-defined]
        self.assertEqual([u.name for u in store.list_users()], ["alice", "bob"])  # type: ignore[attr-defined]
        self.assertEqual(store.get_user("bob").password_hash, "h2")  # type: ignore[attr-defined,union-attr]

    def test_remove_user_ends_sessions(self) -> None:
        store = self._store()
        store.add_user(UserRecord("alice", "u1", "h", "t"))
        store.put_session(_session("d1", "u1"))
        store.put_session(_session("d2", "u2"))
        self.assertTrue(store.remove_user("alice"))  # type: ignore[attr-defined]
        self.assertFalse(store.remove_user("alice"))  # type: ignore[attr-defined]
        self.assertIsNone(store.get_user("alice"))  # type: ignore[attr-defined]
        self.assertIsNone(store.get_session("d1"))  # type: ignore[attr-defined]
        self.assertIsNotNone(store.get_session("d2"))  # type: ignore[attr-defined]

    def test_password_change_ends_sessions(self) -> None:
        """A new password hash ends every session of that user, and only of
        that user, and changes the revocation mark that mirrors watch."""
        store = self._store()
        store.add_user(UserRecord("alice", "u1", "h", "t"))
        store.put_session(_session("d1", "u1"))
        store.put_session(_session("d2", "u2"))
        before = store.get_state(SESSIONS_REVOKED_STATE)
        self.assertTrue(store.set_password_hash("alice", "h2"))  # type: ignore[attr-defined]
        self.assertIsNone(store.get_session("d1"))  # type: ignore[attr-defined]
        self.assertIsNotNone(store.get_session("d2"))  # type: ignore[attr-defined]
        self.assertNotEqual(store.get_state(SESSIONS_REVOKED_STATE), before)  # type: ignore[attr-defined]

    def test_revoke_sessions(self) -> None:
        """Sessions end by user or by a digest prefix of at least 8 hex
        digits; each revoke changes the mark; a shorter prefix is refused."""
        store = self._store()
        store.put_session(_session("aaaaaaaa11", "u1"))
        store.put_session(_session("aaaaaaaa22", "u1"))
        store.put_session(_session("bbbbbbbb33", "u2"))
        marks = {store.get_state(SESSIONS_REVOKED_STATE)}
        self.assertEqual(store.revoke_sessions(digest_prefix="bbbbbbbb"), 1)  # type: ignore[attr-defined]
        marks.add(store.get_state(SESSIONS_REVOKED_STATE))
        self.assertEqual(store.revoke_sessions(user_id="u1"), 2)  # type: ignore[attr-defined]
        marks.add(store.get_state(SESSIONS_REVOKED_STATE))
        self.assertEqual(store.count_sessions(), 0)  # type: ignore[attr-defined]
        self.assertEqual(len(marks), 3)  # type: ignore[attr-defined]
        self.assertRaises(ValueError, store.revoke_sessions, digest_prefix="aaaa")  # type: ignore[attr-defined]
        self.assertRaises(ValueError, store.revoke_sessions)  # type: ignore[attr-defined]

    # sessions

    def test_session_round_trip_touch_delete(self) -> None:
        store = self._store()
        record = _session("d1")
        store.put_session(record)
        self.assertEqual(store.get_session("d1"), record)  # type: ignore[attr-defined]
        store.touch_session("d1", 150.0)
        self.assertEqual(store.get_session("d1").last_used, 150.0)  # type: ignore[attr-defined,union-attr]
        store.touch_session("d1", 120.0)  # never moves back
        self.assertEqual(store.get_session("d1").last_used, 150.0)  # type: ignore[attr-defined,union-attr]
        self.assertEqual(store.count_sessions(), 1)  # type: ignore[attr-defined]
        store.delete_session("d1")
        store.delete_session("d1")
        self.assertIsNone(store.get_session("d1"))  # type: ignore[attr-defined]
        self.assertEqual(store.count_sessions(), 0)  # type: ignore[attr-defined]

    def test_list_sessions(self) -> None:
        store = self._store()
        self.assertEqual(store.list_sessions(), [])  # type: ignore[attr-defined]
        store.put_session(_session("d1", "u1"))
        store.put_session(_session("d2", "u2", last_used=200.0))
        listed = sorted(store.list_sessions(), key=lambda record: record.digest)
        self.assertEqual(listed, [_session("d1", "u1"), _session("d2", "u2", last_used=200.0)])  # type: ignore[attr-defined]

    def test_expired_sessions_swept(self) -> None:
        store = self._store()
        store.put_session(_session("idle", last_used=100.0, expires_at=10_000.0))
        store.put_session(_session("old", last_used=450.0, expires_at=480.0))
        store.put_session(_session("live", last_used=450.0, expires_at=10_000.0))
        self.assertEqual(store.delete_expired_sessions(500.0, 300.0), 2)  # type: ignore[attr-defined]
        self.assertIsNotNone(store.get_session("live"))  # type: ignore[attr-defined]
        self.assertIsNone(store.get_session("idle"))  # type: ignore[attr-defined]

    # login throttling

    def test_login_attempts_per_account(self) -> None:
        """Attempts on one account from one certificate are recorded up to
        the per-account limit; then nothing more is recorded and the answer
        is the time of the oldest attempt within the limit.  Other accounts,
        other certificates and attempts before C{since} do not count."""
        store = self._store()
        self.assertIsNone(store.reserve_login_attempt(_attempt(0, 5.0), 0.0, 3, 20))  # type: ignore[attr-defined]
        for number, at in enumerate((10.0, 20.0, 30.0), start=1):
            self.assertIsNone(store.reserve_login_attempt(_attempt(number, at), 7.0, 3, 20))  # type: ignore[attr-defined]
        self.assertEqual(store.reserve_login_attempt(_attempt(4, 40.0), 7.0, 3, 20), 10.0)  # type: ignore[attr-defined]
        self.assertEqual(store.reserve_login_attempt(_attempt(5, 40.0), 15.0, 3, 20), None)  # type: ignore[attr-defined]
        self.assertEqual(store.reserve_login_attempt(_attempt(6, 41.0), 15.0, 3, 20), 20.0)  # type: ignore[attr-defined]
        other_account = _attempt(7, 41.0, account="b" * 64)
        self.assertIsNone(store.reserve_login_attempt(other_account, 15.0, 3, 20))  # type: ignore[attr-defined]
        other_certificate = _attempt(8, 41.0, certificate="d" * 64)
        self.assertIsNone(store.reserve_login_attempt(other_certificate, 15.0, 3, 20))  # type: ignore[attr-defined]

    def test_login_attempts_per_certificate(self) -> None:
        """A certificate's attempts on all accounts add up to the
        per-certificate limit; another certificate is not affected."""
        store = self._store()
        for number in range(4):
            attempt = _attempt(number, 10.0 + number, account=f"{number:064x}")
            self.assertIsNone(store.reserve_login_attempt(attempt, 0.0, 3, 4))  # type: ignore[attr-defined]
        refused = _attempt(9, 20.0, account="f" * 64)
        self.assertEqual(store.reserve_login_attempt(refused, 0.0, 3, 4), 10.0)  # type: ignore[attr-defined]
        self.assertEqual(store.reserve_login_attempt(refused, 10.5, 3, 4), None)  # type: ignore[attr-defined]
        elsewhere = _attempt(10, 20.0, certificate="d" * 64)
        self.assertIsNone(store.reserve_login_attempt(elsewhere, 0.0, 3, 4))  # type: ignore[attr-defined]

    def test_login_attempts_both_full(self) -> None:
        """With both limits reached the answer is the later of the two
        times: the attempt is allowed only once both have room."""
        store = self._store()
        for number, at in enumerate((1.0, 2.0, 3.0)):
            self.assertIsNone(store.reserve_login_attempt(_attempt(number, at), 0.0, 3, 5))  # type: ignore[attr-defined]
        for number, at in enumerate((4.0, 5.0), start=3):
            attempt = _attempt(number, at, account="b" * 64)
            self.assertIsNone(store.reserve_login_attempt(attempt, 0.0, 3, 5))  # type: ignore[attr-defined]
        # Account a: 1, 2, 3 → full from 1; the certificate: 1..5 → from 1.
        self.assertEqual(store.reserve_login_attempt(_attempt(9, 6.0), 0.0, 3, 5), 1.0)  # type: ignore[attr-defined]
        # Since 1: a has 2, 3 and the certificate 2..5: room in both.
        self.assertIsNone(store.reserve_login_attempt(_attempt(10, 6.0), 1.0, 3, 5))  # type: ignore[attr-defined]
        self.assertEqual(store.reserve_login_attempt(_attempt(11, 7.0), 1.0, 3, 5), 2.0)  # type: ignore[attr-defined]
        self.assertIsNone(store.reserve_login_attempt(_attempt(12, 7.0), 2.0, 3, 5))  # type: ignore[attr-defined]
        # Since 2: a has 3, 6, 7 (full from 3), the certificate 3..7 (from
        # 3); with a per-account limit of 2, a is full from 6: the later.
        self.assertEqual(store.reserve_login_attempt(_attempt(13, 8.0), 2.0, 3, 5), 3.0)  # type: ignore[attr-defined]
        self.assertEqual(store.reserve_login_attempt(_attempt(14, 8.0), 2.0, 2, 5), 6.0)  # type: ignore[attr-defined]

    def test_login_attempt_release(self) -> None:
        """A released attempt no longer counts; releasing twice, or an
        unknown attempt, is harmless."""
        store = self._store()
        for number in range(3):
            self.assertIsNone(store.reserve_login_attempt(_attempt(number, 10.0), 0.0, 3, 20))  # type: ignore[attr-defined]
        self.assertEqual(store.reserve_login_attempt(_attempt(3, 10.0), 0.0, 3, 20), 10.0)  # type: ignore[attr-defined]
        store.release_login_attempt("attempt-1")
        store.release_login_attempt("attempt-1")
        store.release_login_attempt("attempt-unknown")
        self.assertIsNone(store.reserve_login_attempt(_attempt(4, 10.0), 0.0, 3, 20))  # type: ignore[attr-defined]
        self.assertEqual(store.reserve_login_attempt(_attempt(5, 10.0), 0.0, 3, 20), 10.0)  # type: ignore[attr-defined]

    def test_login_attempts_cleared_by_account(self) -> None:
        """Clearing an account forgets its attempts from every certificate,
        and so their weight in each certificate's total, and nothing else."""
        store = self._store()
        for number, certificate in enumerate(("c" * 64, "d" * 64)):
            for index in range(2):
                attempt = _attempt(10 * number + index, 1.0, certificate=certificate)
                self.assertIsNone(store.reserve_login_attempt(attempt, 0.0, 2, 3))  # type: ignore[attr-defined]
        bob = _attempt(30, 1.0, account="b" * 64)
        self.assertIsNone(store.reserve_login_attempt(bob, 0.0, 2, 3))  # type: ignore[attr-defined]
        self.assertEqual(store.reserve_login_attempt(_attempt(31, 2.0, account="e" * 64), 0.0, 2, 3), 1.0)  # type: ignore[attr-defined]
        self.assertEqual(store.clear_login_attempts("a" * 64), 4)  # type: ignore[attr-defined]
        self.assertEqual(store.clear_login_attempts("a" * 64), 0)  # type: ignore[attr-defined]
        self.assertIsNone(store.reserve_login_attempt(_attempt(32, 2.0), 0.0, 2, 3))  # type: ignore[attr-defined]
        self.assertIsNone(store.reserve_login_attempt(_attempt(33, 2.0), 0.0, 2, 3))  # type: ignore[attr-defined]
        # bob's attempt was kept: c has bob's and two of a's now.
        self.assertEqual(store.reserve_login_attempt(_attempt(34, 2.0, account="e" * 64), 0.0, 2, 3), 1.0)  # type: ignore[attr-defined]

    def test_login_attempts_forgotten(self) -> None:
        """The sweep forgets attempts at or before a time, and only those."""
        store = self._store()
        for number, at in enumerate((10.0, 20.0, 30.0)):
            self.assertIsNone(store.reserve_login_attempt(_attempt(number, at), 0.0, 5, 20))  # type: ignore[attr-defined]
        self.assertEqual(store.forget_login_attempts(20.0), 2)  # type: ignore[attr-defined]
        self.assertEqual(store.forget_login_attempts(20.0), 0)  # type: ignore[attr-defined]
        for number in range(3, 7):
            self.assertIsNone(store.reserve_login_attempt(_attempt(number, 40.0), 0.0, 5, 20))  # type: ignore[attr-defined]
        self.assertEqual(store.reserve_login_attempt(_attempt(7, 40.0), 0.0, 5, 20), 30.0)  # type: ignore[attr-defined]

    def test_login_attempts_exact_under_concurrency(self) -> None:
        """Attempts reserved at once from many threads, through two stores on
        one backend (two nodes), never exceed a limit: of 20 concurrent
        attempts on one account exactly 5 are recorded, and of 24 on
        different accounts from another certificate exactly 20."""
        first = self._store()
        second = self.reopen_store(first)
        self.addCleanup(second.close)  # type: ignore[attr-defined]
        cases = [(f"one-{n}", "c" * 64, "a" * 64) for n in range(20)]
        cases += [(f"many-{n}", "d" * 64, f"{n:064x}") for n in range(24)]
        start = threading.Barrier(len(cases))
        results: dict[str, float | None] = {}
        errors: list[BaseException] = []

        def work(index: int, attempt: LoginAttempt) -> None:
            store = first if index % 2 else second
            try:
                start.wait(timeout=30)
                results[attempt.attempt_id] = store.reserve_login_attempt(attempt, 0.0, 5, 20)
            except BaseException as error:
                errors.append(error)

        threads = [
            threading.Thread(target=work, args=(index, LoginAttempt(name, certificate, account, 10.0)))
            for index, (name, certificate, account) in enumerate(cases)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(errors, [])  # type: ignore[attr-defined]
        recorded = {name for name, result in results.items() if result is None}
        self.assertEqual(len([name for name in recorded if name.startswith("one-")]), 5)  # type: ignore[attr-defined]
        self.assertEqual(len([name for name in recorded if name.startswith("many-")]), 20)  # type: ignore[attr-defined]
        self.assertEqual(len(results), 44)  # type: ignore[attr-defined]
        self.assertEqual(first.forget_login_attempts(10.0), 25)  # type: ignore[attr-defined]

    # the archive index

    def test_archive_index(self) -> None:
        store = self._store()
        store.put_archive(_archive("o1", "a" * 32, 1, 10))
        store.put_archive(_archive("o1", "b" * 32, 3, 20))
        store.put_archive(_archive("o1", "c" * 32, 2, 30))
        store.put_archive(_archive("o2", "d" * 32, 5, 40))
        self.assertEqual([r.archive_id[0] for r in store.list_archives("o1")], ["b", "c", "a"])  # type: ignore[attr-defined]
        self.assertEqual(store.get_archive("o1", "a" * 32), _archive("o1", "a" * 32, 1, 10))  # type: ignore[attr-defined]
        self.assertIsNone(store.get_archive("o2", "a" * 32))  # type: ignore[attr-defined]
        self.assertEqual(store.usage("o1"), 60)  # type: ignore[attr-defined]
        self.assertEqual(store.usage("nobody"), 0)  # type: ignore[attr-defined]
        self.assertEqual(store.owners(), ["o1", "o2"])  # type: ignore[attr-defined]
        self.assertEqual(store.find_archive_owner("d" * 32), "o2")  # type: ignore[attr-defined]
        self.assertIsNone(store.find_archive_owner("e" * 32))  # type: ignore[attr-defined]
        self.assertEqual(len(store.all_archive_ids()), 4)  # type: ignore[attr-defined]
        self.assertTrue(store.delete_archive("o1", "a" * 32))  # type: ignore[attr-defined]
        self.assertFalse(store.delete_archive("o1", "a" * 32))  # type: ignore[attr-defined]
        self.assertEqual(store.usage("o1"), 50)  # type: ignore[attr-defined]

    def test_duplicate_archive_refused(self) -> None:
        store = self._store()
        store.put_archive(_archive("o1", "a" * 32, 1))
        with self.assertRaises(Exception):  # type: ignore[attr-defined]  # noqa: B017 (each backend its own)
            store.put_archive(_archive("o1", "a" * 32, 2))
        self.assertEqual(store.get_archive("o1", "a" * 32).created_ns, 1)  # type: ignore[attr-defined,union-attr]

    def test_put_archive_within_quota(self) -> None:
        """With a quota, a row goes in only while the owner's stored bytes,
        this archive's included, stay within it; a refused row leaves
        nothing, and other owners and unlimited puts are not affected."""
        store = self._store()
        store.put_archive(_archive("o1", "a" * 32, 1, 600), quota=1000)
        store.put_archive(_archive("o2", "b" * 32, 2, 900), quota=1000)
        with self.assertRaises(OverQuota):  # type: ignore[attr-defined]
            store.put_archive(_archive("o1", "c" * 32, 3, 401), quota=1000)
        self.assertIsNone(store.get_archive("o1", "c" * 32))  # type: ignore[attr-defined]
        self.assertEqual(store.usage("o1"), 600)  # type: ignore[attr-defined]
        store.put_archive(_archive("o1", "d" * 32, 4, 400), quota=1000)  # exactly full
        self.assertEqual(store.usage("o1"), 1000)  # type: ignore[attr-defined]
        self.assertRaises(OverQuota, store.put_archive, _archive("o1", "e" * 32, 5, 1), quota=1000)  # type: ignore[attr-defined]
        self.assertRaises(OverQuota, store.put_archive, _archive("o3", "f" * 32, 6, 1), quota=0)  # type: ignore[attr-defined]
        store.put_archive(_archive("o1", "e" * 32, 7, 5000))  # no quota: the admin tools' copies
        self.assertEqual(store.usage("o1"), 6000)  # type: ignore[attr-defined]

    def test_put_archive_quota_is_exact_under_concurrency(self) -> None:
        """Puts of one owner racing from many threads on two store instances
        (two nodes) never insert more than the quota in all: of 12 archives
        of 400 bytes under a quota of 1000, exactly 2 go in."""
        first = self._store()
        second = self.reopen_store(first)
        self.addCleanup(second.close)  # type: ignore[attr-defined]
        stores = [first, second]
        barrier = threading.Barrier(12)
        outcomes: list[str] = []
        lock = threading.Lock()

        def put(n: int) -> None:
            try:
                barrier.wait(10)
                stores[n % 2].put_archive(_archive("o1", f"{n:032x}", n, 400), quota=1000)
                outcome = "stored"
            except OverQuota:
                outcome = "over"
            except BaseException as error:
                outcome = repr(error)
            with lock:
                outcomes.append(outcome)

        threads = [threading.Thread(target=put, args=(n,)) for n in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        self.assertEqual(sorted(outcomes), ["over"] * 10 + ["stored"] * 2)  # type: ignore[attr-defined]
        self.assertEqual(first.usage("o1"), 800)  # type: ignore[attr-defined]
        self.assertEqual(len(second.list_archives("o1")), 2)  # type: ignore[attr-defined]

    def test_replace_archive_key_is_conditional(self) -> None:
        store = self._store()
        store.put_archive(_archive("o1", "a" * 32, 1, key_id="k1"))
        self.assertTrue(store.replace_archive_key("o1", "a" * 32, "k1", "k2", "new"))  # type: ignore[attr-defined]
        self.assertFalse(store.replace_archive_key("o1", "a" * 32, "k1", "k3", "newer"))  # type: ignore[attr-defined]
        record = store.get_archive("o1", "a" * 32)
        self.assertEqual((record.key_id, record.document), ("k2", "new"))  # type: ignore[attr-defined,union-attr]

    # state

    def test_state(self) -> None:
        store = self._store()
        self.assertIsNone(store.get_state("rotation"))  # type: ignore[attr-defined]
        store.set_state("rotation", "k2")
        store.set_state("rotation", "k3")
        self.assertEqual(store.get_state("rotation"), "k3")  # type: ignore[attr-defined]
        store.set_state("rotation", None)
        self.assertIsNone(store.get_state("rotation"))  # type: ignore[attr-defined]

    def test_add_state_keeps_the_first_value(self) -> None:
        """add_state sets a name only when it has no value and returns the
        value it holds then; across two stores on one backend (two nodes
        starting at once), and from many threads at once, one value wins and
        every caller is told that one."""
        store = self._store()
        self.assertEqual(store.add_state("check", "first"), "first")  # type: ignore[attr-defined]
        self.assertEqual(store.add_state("check", "second"), "first")  # type: ignore[attr-defined]
        self.assertEqual(store.get_state("check"), "first")  # type: ignore[attr-defined]
        other = self.reopen_store(store)
        self.addCleanup(other.close)  # type: ignore[attr-defined]
        self.assertEqual(other.add_state("check", "third"), "first")  # type: ignore[attr-defined]
        results: list[str] = []
        stores = [store, other]
        threads = [
            threading.Thread(target=lambda n=n: results.append(stores[n % 2].add_state("race", f"v{n}")))
            for n in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        self.assertEqual(len(results), 8)  # type: ignore[attr-defined]
        self.assertEqual(set(results), {store.get_state("race")})  # type: ignore[attr-defined]

    def test_text_round_trips_exactly(self) -> None:
        store = self._store()
        name = "a.b_c@d-e"
        store.add_user(UserRecord(name, "u" * 32, "scrypt$32768$8$1$c2FsdA==$aGFzaA==", "t"))
        self.assertEqual(store.get_user(name).name, name)  # type: ignore[attr-defined,union-attr]
        document = '{"filename": "r\\u00e9sum\\u00e9 \\ud83d\\ude00.txt"}'
        store.put_archive(ArchiveRecord("o1", "a" * 32, 2**62, 2**40, "k", document))
        record = store.get_archive("o1", "a" * 32)
        self.assertEqual((record.document, record.created_ns, record.stored_bytes), (document, 2**62, 2**40))  # type: ignore[attr-defined,union-attr]

    def test_many_threads(self) -> None:
        """Every method is safe from the worker pool's threads at once."""
        store = self._store()
        errors: list[BaseException] = []

        def work(n: int) -> None:
            try:
                for i in range(20):
                    store.put_archive(_archive(f"o{n}", f"{n:02x}{i:030x}", i))
                    store.reserve_login_attempt(_attempt(100 * n + i, float(i), account=f"{n:064x}"), 0.0, 5, 20)
                    store.list_archives(f"o{n}")
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(errors, [])  # type: ignore[attr-defined]
        self.assertEqual(sum(len(store.list_archives(f"o{n}")) for n in range(4)), 80)  # type: ignore[attr-defined]

    def test_shared_between_instances(self) -> None:
        """Two stores on one backend see each other's writes (two nodes)."""
        first = self._store()
        second = self.reopen_store(first)
        self.addCleanup(second.close)  # type: ignore[attr-defined]
        first.put_session(_session("d1"))
        self.assertIsNotNone(second.get_session("d1"))  # type: ignore[attr-defined]
        second.delete_session("d1")
        self.assertIsNone(first.get_session("d1"))  # type: ignore[attr-defined]
        self.assertIsNone(first.reserve_login_attempt(_attempt(1, 10.0), 0.0, 1, 20))  # type: ignore[attr-defined]
        self.assertEqual(second.reserve_login_attempt(_attempt(2, 11.0), 0.0, 1, 20), 10.0)  # type: ignore[attr-defined]

    def reopen_store(self, store: MetadataStore) -> MetadataStore:
        """A second store on the same backend as C{store}."""
        raise NotImplementedError


class BlobStoreContract:
    """Mixed into a trial TestCase; C{make_store} returns a fresh store."""

    def make_store(self) -> BlobStore:
        raise NotImplementedError

    def _put(self, store: BlobStore, owner: str, archive_id: str, pieces: list[bytes]) -> int:
        writer = store.writer(owner, archive_id)
        for piece in pieces:
            writer.write(memoryview(piece))
        return writer.commit()

    def _get(self, store: BlobStore, owner: str, archive_id: str, size: int = 65536) -> bytes:
        reader = store.reader(owner, archive_id)
        try:
            out = []
            while block := reader.read(size):
                out.append(block)
            return b"".join(out)
        finally:
            reader.close()

    def test_round_trip(self) -> None:
        store = self.make_store()
        data = os.urandom(300_000)
        size = self._put(store, "o1", "a" * 32, [data[:1], data[1:100_000], b"", data[100_000:]])
        self.assertEqual(size, len(data))  # type: ignore[attr-defined]
        self.assertEqual(self._get(store, "o1", "a" * 32), data)  # type: ignore[attr-defined]
        self.assertEqual(self._get(store, "o1", "a" * 32, size=7), data)  # type: ignore[attr-defined]

    def _get_range(self, store: BlobStore, owner: str, archive_id: str, start: int, length: int, size: int) -> bytes:
        reader = store.range_reader(owner, archive_id, start, length)
        try:
            out = []
            while block := reader.read(size):
                out.append(block)
            return b"".join(out)
        finally:
            reader.close()

    def test_range_reader(self) -> None:
        """A range reader returns exactly the blob's bytes in the range,
        fewer where the blob ends first and none past its end, in reads of
        any size."""
        store = self.make_store()
        data = os.urandom(300_000)
        self._put(store, "o1", "a" * 32, [data[:123_456], data[123_456:]])
        ranges = [(0, 10), (5, 100_000), (123_450, 20), (299_990, 100), (299_999, 1), (0, 300_000), (0, 10**9)]
        ranges += [(300_000, 10), (400_000, 5), (7, 0), (300_000, 0)]
        for start, length in ranges:
            for size in (7, 65536, 1 << 20):
                got = self._get_range(store, "o1", "a" * 32, start, length, size)
                self.assertEqual(got, data[start : start + length], (start, length, size))  # type: ignore[attr-defined]

    def test_range_reader_missing_or_empty(self) -> None:
        """A range of a missing blob raises BlobNotFound (even an empty
        range); a range of an empty blob is empty; names are checked."""
        store = self.make_store()
        for length in (0, 10):
            with self.assertRaises(BlobNotFound):  # type: ignore[attr-defined]
                store.range_reader("o1", "b" * 32, 0, length)
        self._put(store, "o1", "c" * 32, [])
        self.assertEqual(self._get_range(store, "o1", "c" * 32, 0, 10, 100), b"")  # type: ignore[attr-defined]
        self.assertEqual(self._get_range(store, "o1", "c" * 32, 5, 10, 100), b"")  # type: ignore[attr-defined]
        with self.assertRaises(ValueError):  # type: ignore[attr-defined]
            store.range_reader("../x", "a" * 32, 0, 1)

    def test_empty_blob(self) -> None:
        store = self.make_store()
        self.assertEqual(self._put(store, "o1", "a" * 32, []), 0)  # type: ignore[attr-defined]
        self.assertEqual(self._get(store, "o1", "a" * 32), b"")  # type: ignore[attr-defined]

    def test_large_blob_streams(self) -> None:
        """More than one part of any chunked upload scheme (S3: 8 MiB parts)."""
        store = self.make_store()
        block = os.urandom(1 << 20)
        writer = store.writer("o1", "b" * 32)
        for i in range(19):
            writer.write(memoryview(bytes([i]) + block[1:]))
        self.assertEqual(writer.commit(), 19 << 20)  # type: ignore[attr-defined]
        reader = store.reader("o1", "b" * 32)
        try:
            for i in range(19):
                got = b""
                while len(got) < 1 << 20:
                    more = reader.read((1 << 20) - len(got))
                    self.assertTrue(more)  # type: ignore[attr-defined]
                    got += more
                self.assertEqual(got, bytes([i]) + block[1:])  # type: ignore[attr-defined]
            self.assertEqual(reader.read(10), b"")  # type: ignore[attr-defined]
        finally:
            reader.close()

    def test_invisible_until_commit(self) -> None:
        store = self.make_store()
        writer = store.writer("o1", "a" * 32)
        writer.write(b"x" * 1000)
        self.assertRaises(BlobNotFound, store.reader, "o1", "a" * 32)  # type: ignore[attr-defined]
        self.assertEqual(list(store.list()), [])  # type: ignore[attr-defined]
        writer.commit()
        self.assertEqual([(e.owner_id, e.archive_id, e.size) for e in store.list()], [("o1", "a" * 32, 1000)])  # type: ignore[attr-defined]

    def test_abort_leaves_nothing(self) -> None:
        store = self.make_store()
        writer = store.writer("o1", "a" * 32)
        writer.write(os.urandom(9 << 20))
        writer.abort()
        writer.abort()
        self.assertRaises(BlobNotFound, store.reader, "o1", "a" * 32)  # type: ignore[attr-defined]
        self.assertEqual(list(store.list()), [])  # type: ignore[attr-defined]
        store.remove_incomplete()
        self.assertEqual(list(store.list()), [])  # type: ignore[attr-defined]

    def test_delete(self) -> None:
        store = self.make_store()
        self._put(store, "o1", "a" * 32, [b"one"])
        self._put(store, "o2", "a" * 32, [b"two"])
        store.delete("o1", "a" * 32)
        store.delete("o1", "a" * 32)  # missing is fine
        self.assertRaises(BlobNotFound, store.reader, "o1", "a" * 32)  # type: ignore[attr-defined]
        self.assertEqual(self._get(store, "o2", "a" * 32), b"two")  # type: ignore[attr-defined]

    def test_list_names_and_times(self) -> None:
        store = self.make_store()
        before = time.time() - 120
        self._put(store, "o1", "a" * 32, [b"1"])
        self._put(store, "o1", "b" * 32, [b"22"])
        self._put(store, "o_2", "c" * 32, [b"333"])
        entries = sorted(store.list(), key=lambda e: (e.owner_id, e.archive_id))
        self.assertEqual(  # type: ignore[attr-defined]
            [(e.owner_id, e.archive_id, e.size) for e in entries],
            [("o1", "a" * 32, 1), ("o1", "b" * 32, 2), ("o_2", "c" * 32, 3)],
        )
        for entry in entries:
            self.assertTrue(before < entry.modified < time.time() + 120)  # type: ignore[attr-defined]

    def test_hostile_names_refused(self) -> None:
        store = self.make_store()
        for owner, archive_id in [("../x", "a" * 32), ("o1", "../" + "a" * 29), ("o1", "A" * 32), ("", "a" * 32)]:
            with self.assertRaises(ValueError):  # type: ignore[attr-defined]
                store.writer(owner, archive_id)
            with self.assertRaises(ValueError):  # type: ignore[attr-defined]
                store.reader(owner, archive_id)

    def test_concurrent_writers(self) -> None:
        store = self.make_store()
        errors: list[BaseException] = []
        payloads = {f"{n:032x}": os.urandom(200_000 + n) for n in range(4)}

        def work(archive_id: str, data: bytes) -> None:
            try:
                self._put(store, "o1", archive_id, [data[i : i + 65536] for i in range(0, len(data), 65536)])
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=work, args=item) for item in payloads.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(errors, [])  # type: ignore[attr-defined]
        for archive_id, data in payloads.items():
            self.assertEqual(self._get(store, "o1", archive_id), data)  # type: ignore[attr-defined]

    def test_overwrite_is_atomic(self) -> None:
        """A name is written once by the vault; a second commit replaces the
        blob whole, never leaving a mix."""
        store = self.make_store()
        self._put(store, "o1", "a" * 32, [b"first" * 1000])
        self._put(store, "o1", "a" * 32, [b"second" * 1000])
        self.assertEqual(self._get(store, "o1", "a" * 32), b"second" * 1000)  # type: ignore[attr-defined]
