# -*- test-case-name: tests.test_scaleout_tus -*-
"""Resumable (tus) uploads across two real nodes sharing one PostgreSQL
schema and one S3 bucket (the L{TwoNodes} fixture of L{tests.test_scaleout}).

Everything goes through HTTP over mutual TLS, as a client behind a load
balancer without stickiness would send it: any node takes the next PATCH,
answers HEAD, DELETE, the quota and the expiry sweep for an upload created on
the other; a node killed after acknowledging a PATCH loses nothing of it.
The bucket is read with the test's own boto3 client to see the staged pieces
come and go.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import time
from email.utils import parsedate_to_datetime

from tests.support.daemon import (
    WAIT_SECONDS,
    RawResponse,
    call,
    connect,
    download_sha256,
    list_files,
    login,
    raw_upload_head,
    request_head,
    send_until_answered,
)
from tests.test_scaleout import TwoNodes

PATCH_BYTES = 64 * 1024
TUS = ("Tus-Resumable", "1.0.0")


class TusClient:
    """Hand-made tus requests to one node at a time (the port chooses it)."""

    def __init__(self, nodes: TwoNodes, session: str) -> None:
        self.context = nodes.context
        self.session = session

    def create(self, port: int, length: int, filename: str = "staged.bin") -> RawResponse:
        encoded = base64.b64encode(filename.encode()).decode()
        headers = [TUS, ("Upload-Length", str(length)), ("Upload-Metadata", f"filename {encoded}")]
        return call(self.context, port, "POST", "/uploads/", headers=headers, session=self.session)

    def patch(self, port: int, upload_id: str, offset: int, body: bytes) -> RawResponse:
        digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
        headers = [
            TUS,
            ("Content-Type", "application/offset+octet-stream"),
            ("Upload-Offset", str(offset)),
            ("Upload-Checksum", f"sha256 {digest}"),
        ]
        return call(
            self.context, port, "PATCH", f"/uploads/{upload_id}", body=body, headers=headers, session=self.session
        )

    def head(self, port: int, upload_id: str) -> RawResponse:
        return call(self.context, port, "HEAD", f"/uploads/{upload_id}", headers=[TUS], session=self.session)

    def delete(self, port: int, upload_id: str) -> RawResponse:
        return call(self.context, port, "DELETE", f"/uploads/{upload_id}", headers=[TUS], session=self.session)


class TusNodes(TwoNodes):
    """The two nodes, alice's session (made on A) and tus helpers."""

    def setUp(self) -> None:
        super().setUp()
        self.session = login(self.context, self.ports[0])
        self.tus = TusClient(self, self.session)

    def keys(self) -> list[str]:
        """Every object in the vault's prefix of the bucket."""
        listed = self.s3.list_objects_v2(Bucket=self.bucket, Prefix="vault/")
        return sorted(item["Key"] for item in listed.get("Contents", ()))

    def assertNoIncompleteUploads(self) -> None:
        self.assertEqual(self.s3.list_multipart_uploads(Bucket=self.bucket).get("Uploads", []), [])

    def start_upload(self, port: int, length: int) -> str:
        created = self.tus.create(port, length)
        self.assertEqual(created.status, 201, created.body)
        location = created.headers["location"]
        self.assertTrue(location.startswith("/uploads/"), location)
        return location[len("/uploads/") :]

    def send(self, port: int, upload_id: str, data: bytes, offset: int) -> RawResponse:
        """PATCH the next piece (at most PATCH_BYTES) from C{offset}; 204 required."""
        piece = data[offset : offset + PATCH_BYTES]
        answer = self.tus.patch(port, upload_id, offset, piece)
        self.assertEqual(answer.status, 204, answer.body)
        self.assertEqual(int(answer.headers["upload-offset"]), offset + len(piece))
        return answer

    def assertOffset(self, port: int, upload_id: str, offset: int, length: int) -> None:
        answer = self.tus.head(port, upload_id)
        self.assertEqual(answer.status, 200, answer.body)
        self.assertEqual(int(answer.headers["upload-offset"]), offset)
        self.assertEqual(int(answer.headers["upload-length"]), length)

    def assertArchive(self, archive_id: str, data: bytes, ports: list[int]) -> None:
        """Listed and downloaded byte-exact through each of C{ports}; the
        bucket holds only the archive once the leftover pieces are removed
        (no staged piece is left)."""
        for port in ports:
            listed = list_files(self.context, port, self.session)
            self.assertEqual(
                [(f["id"], f["filename"], f["size"]) for f in listed], [(archive_id, "staged.bin", len(data))]
            )
            self.assertEqual(
                download_sha256(self.context, port, self.session, archive_id), hashlib.sha256(data).hexdigest()
            )
        # The pieces' objects are removed after the last PATCH's answer
        # (PieceResult.leftover): wait for that, boundedly.
        deadline = time.monotonic() + WAIT_SECONDS
        keys = self.keys()
        while len(keys) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
            keys = self.keys()
        [key] = keys
        self.assertTrue(key.endswith(f"/{archive_id}.body"), key)
        self.assertNoIncompleteUploads()


class TusAcrossNodesTests(TusNodes):
    """tus with the two nodes taking turns, as behind a non-sticky load balancer."""

    def test_patches_alternate_between_nodes(self) -> None:
        """Created on A, PATCHed on A, B, A, ... each at the offset the other
        acknowledged; HEAD on the other node agrees after every PATCH; the
        last PATCH, on B, answers Upload-Archive-Id; the archive is listed
        and downloads byte-exact from both nodes."""
        a, b = self.ports
        data = os.urandom(5 * PATCH_BYTES + 1234)
        upload_id = self.start_upload(a, len(data))
        self.assertOffset(b, upload_id, 0, len(data))
        offset, turn, answer = 0, 0, None
        while offset < len(data):
            port, other = (a, b) if turn % 2 == 0 else (b, a)
            answer = self.send(port, upload_id, data, offset)
            offset = int(answer.headers["upload-offset"])
            turn += 1
            if offset < len(data):
                self.assertNotIn("upload-archive-id", answer.headers)
                self.assertOffset(other, upload_id, offset, len(data))
        self.assertEqual(turn, 6)  # so the last PATCH went to B
        assert answer is not None
        archive_id = answer.headers["upload-archive-id"]
        self.assertArchive(archive_id, data, [a, b])
        for port in (a, b):  # the finished upload is gone on both
            self.assertEqual(self.tus.head(port, upload_id).status, 404)

    def test_same_patch_on_both_nodes_at_once(self) -> None:
        """The same PATCH sent to A and B at once (a client retrying on the
        other node): one is acknowledged, the other is 409 and leaves no
        piece behind; the upload then finishes byte-exact."""
        a, b = self.ports
        data = os.urandom(2 * PATCH_BYTES + 99)
        upload_id = self.start_upload(a, len(data))
        piece = data[:PATCH_BYTES]
        head = request_head(
            "PATCH",
            f"/uploads/{upload_id}",
            [
                TUS,
                ("Content-Type", "application/offset+octet-stream"),
                ("Upload-Offset", "0"),
                ("Content-Length", str(len(piece))),
                ("Authorization", f"Bearer {self.session}"),
            ],
        )
        together = threading.Barrier(2, timeout=20)
        answers: dict[int, RawResponse] = {}

        def patch(port: int) -> None:
            with connect(self.context, port) as sock:
                together.wait()
                answers[port] = send_until_answered(sock, head, piece)

        threads = [threading.Thread(target=patch, args=(port,)) for port in (a, b)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        self.assertEqual(sorted(answer.status for answer in answers.values()), [204, 409], answers)
        [refused] = [answer for answer in answers.values() if answer.status == 409]
        self.assertEqual(refused.json()["error"], "offset_mismatch")
        self.assertEqual(len(self.keys()), 1)  # only the acknowledged piece
        self.assertOffset(b, upload_id, PATCH_BYTES, len(data))
        self.send(b, upload_id, data, PATCH_BYTES)
        answer = self.send(a, upload_id, data, 2 * PATCH_BYTES)
        self.assertArchive(answer.headers["upload-archive-id"], data, [a, b])

    def test_node_killed_after_an_acknowledged_patch(self) -> None:
        """A acknowledges two PATCHes, receives half of a third, and is
        killed (SIGKILL): B's HEAD gives the acknowledged offset (the
        unacknowledged half is not counted), B takes the remaining PATCHes
        and the archive is byte-exact."""
        a, b = self.ports
        data = os.urandom(4 * PATCH_BYTES + 4321)
        upload_id = self.start_upload(a, len(data))
        self.send(a, upload_id, data, 0)
        self.send(a, upload_id, data, PATCH_BYTES)
        piece = data[2 * PATCH_BYTES : 3 * PATCH_BYTES]
        headers = [
            TUS,
            ("Content-Type", "application/offset+octet-stream"),
            ("Upload-Offset", str(2 * PATCH_BYTES)),
            ("Content-Length", str(len(piece))),
            ("Authorization", f"Bearer {self.session}"),
        ]
        with connect(self.context, a) as sock:
            sock.sendall(request_head("PATCH", f"/uploads/{upload_id}", headers) + piece[: len(piece) // 2])
            self.nodes[0].kill()
        self.assertOffset(b, upload_id, 2 * PATCH_BYTES, len(data))
        offset = 2 * PATCH_BYTES
        while offset < len(data):
            answer = self.send(b, upload_id, data, offset)
            offset = int(answer.headers["upload-offset"])
        self.assertArchive(answer.headers["upload-archive-id"], data, [b])

    def test_head_on_the_other_node_finishes_a_complete_upload(self) -> None:
        """Every byte acknowledged but no archive made (node A, restarted
        with a --quota too small for the file, refuses the archive with 507
        after committing the last piece): a HEAD on B makes the archive and
        answers Upload-Archive-Id; the archive is byte-exact."""
        _, b = self.ports
        self.nodes[0].kill()
        a = self.start_node("a", "--quota", str(PATCH_BYTES)).wait_listening()
        data = os.urandom(PATCH_BYTES + 777)
        upload_id = self.start_upload(b, len(data))
        self.send(b, upload_id, data, 0)
        refused = self.tus.patch(a, upload_id, PATCH_BYTES, data[PATCH_BYTES:])
        self.assertEqual(refused.status, 507, refused.body)
        self.assertEqual(list_files(self.context, b, self.session), [])
        answer = self.tus.head(b, upload_id)
        self.assertEqual(answer.status, 200, answer.body)
        self.assertEqual(int(answer.headers["upload-offset"]), len(data))
        self.assertArchive(answer.headers["upload-archive-id"], data, [a, b])
        self.assertEqual(self.tus.head(a, upload_id).status, 404)

    def test_delete_on_the_other_node(self) -> None:
        """An upload created on A, with pieces from both nodes, deleted on
        B: A answers 404 to HEAD and PATCH from then on, and its staged
        pieces are gone from the bucket."""
        a, b = self.ports
        data = os.urandom(3 * PATCH_BYTES)
        upload_id = self.start_upload(a, len(data))
        self.send(a, upload_id, data, 0)
        self.send(b, upload_id, data, PATCH_BYTES)
        self.assertEqual(len(self.keys()), 2)  # one object per acknowledged piece
        deleted = self.tus.delete(b, upload_id)
        self.assertEqual(deleted.status, 204, deleted.body)
        self.assertEqual(self.tus.head(a, upload_id).status, 404)
        refused = self.tus.patch(a, upload_id, 2 * PATCH_BYTES, data[2 * PATCH_BYTES :])
        self.assertEqual(refused.status, 404, refused.body)
        self.assertEqual(refused.json()["error"], "not_found")
        self.assertEqual(self.keys(), [])
        self.assertNoIncompleteUploads()
        self.assertEqual(list_files(self.context, b, self.session), [])


QUOTA_BYTES = 1 << 20


class TusQuotaAcrossNodesTests(TusNodes):
    """Both nodes run with the same --quota: a reservation made on one node
    counts on the other."""

    node_options = ("--quota", str(QUOTA_BYTES))

    def raw_upload(self, port: int, data: bytes) -> RawResponse:
        with connect(self.context, port) as sock:
            return send_until_answered(sock, raw_upload_head("raw.bin", len(data), self.session), data)

    def test_reservation_counts_on_the_other_node(self) -> None:
        """An upload POSTed on A reserves its whole length at once: on B a
        second POST and a raw upload that would not fit beside it are 507
        (a small one still fits); once the upload is DELETEd on B, the same
        raw upload fits."""
        a, b = self.ports
        upload_id = self.start_upload(a, 600 * 1024)
        for refused in (self.tus.create(b, 500 * 1024), self.raw_upload(b, os.urandom(500 * 1024))):
            self.assertEqual(refused.status, 507, refused.body)
            self.assertEqual(refused.json()["error"], "insufficient_storage")
        self.assertEqual(self.raw_upload(b, os.urandom(100 * 1024)).status, 201)
        self.assertEqual(self.tus.delete(b, upload_id).status, 204)
        stored = self.raw_upload(b, os.urandom(500 * 1024))
        self.assertEqual(stored.status, 201, stored.body)
        self.assertEqual(len(list_files(self.context, a, self.session)), 2)


EXPIRY_SECONDS = 2


class TusExpiryAcrossNodesTests(TusNodes):
    """Both nodes run with a short --upload-expiry."""

    node_options = ("--upload-expiry", str(EXPIRY_SECONDS))

    def test_sweep_of_the_other_node_removes_the_upload(self) -> None:
        """An upload created and PATCHed on A makes no progress past its
        expiry: B's sweep (the one a node runs as it starts) removes it, so
        A answers 404, its pieces are gone from the bucket and nothing
        is in progress for the user any more."""
        a, _ = self.ports
        data = os.urandom(3 * PATCH_BYTES)
        upload_id = self.start_upload(a, len(data))
        answer = self.send(a, upload_id, data, 0)
        self.assertEqual(len(self.keys()), 1)
        # Upload-Expires is whole seconds, rounded down: past it by one, it
        # is past for certain.  Only the clock can tell this moment.
        expires = parsedate_to_datetime(answer.headers["upload-expires"]).timestamp() + 1
        time.sleep(max(0.0, expires - time.time()))
        self.nodes[1].kill()
        restarted = self.start_node("b")
        restarted.wait_listening()
        deadline = time.monotonic() + 20
        while "Removed 1 expired resumable uploads" not in restarted.output():
            if time.monotonic() > deadline:
                self.fail(f"node B did not sweep the upload:\n{restarted.output()}")
            time.sleep(0.05)
        self.assertEqual(self.tus.head(a, upload_id).status, 404)
        self.assertEqual(self.keys(), [])
        usage = call(self.context, a, "GET", "/usage", session=self.session)
        self.assertEqual(usage.status, 200, usage.body)
        self.assertEqual(usage.json()["uploads_in_progress"], 0)
