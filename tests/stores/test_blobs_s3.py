"""The blob store contract on S3 (moto's server, or SECUREVAULT_TEST_S3_ENDPOINT),
and what is particular to S3: multipart streaming, aborts, URLs, errors."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from securevault.stores.blobs import BlobNotFound, BlobStore, BlobStoreError

try:
    from securevault.stores.blobs_s3 import MAX_PARTS, PART_BYTES, S3BlobStore
except ImportError:  # no boto3: every test below skips (or fails in CI) first
    pass

from tests.stores.contracts import BlobStoreContract
from tests.support.s3 import make_bucket, make_client, moto_endpoint, require_boto3, s3_environment
from tests.support.testcase import SyncTestCase

OWNER = "o1"
ARCHIVE = "a" * 32


class S3ContractTests(BlobStoreContract, SyncTestCase):
    def make_store(self) -> BlobStore:
        bucket, client = make_bucket(self)
        return S3BlobStore(bucket, prefix="vault/", client=client)


class S3Tests(SyncTestCase):
    def setUp(self) -> None:
        self.bucket, self.client = make_bucket(self)
        self.store = S3BlobStore(self.bucket, prefix="vault/", client=self.client)

    def _uploads(self) -> list[dict[str, Any]]:
        return list(self.client.list_multipart_uploads(Bucket=self.bucket).get("Uploads", []))

    def test_key_layout(self) -> None:
        writer = self.store.writer(OWNER, ARCHIVE)
        writer.write(b"body")
        writer.commit()
        keys = [item["Key"] for item in self.client.list_objects_v2(Bucket=self.bucket)["Contents"]]
        self.assertEqual(keys, [f"vault/{OWNER}/{ARCHIVE}.body"])
        self.assertEqual(S3BlobStore("b-1", client=self.client).key(OWNER, ARCHIVE), f"{OWNER}/{ARCHIVE}.body")
        self.assertEqual(
            S3BlobStore("b-1", "/a/b/", client=self.client).key(OWNER, ARCHIVE), f"a/b/{OWNER}/{ARCHIVE}.body"
        )

    def test_list_ignores_foreign_keys(self) -> None:
        for key in [
            "vault/o1/notanid.body",
            f"vault/o1/{ARCHIVE}.body.tmp",
            f"vault/o1/x/{ARCHIVE}.body",
            f"vault/{ARCHIVE}.body",
            f"other/o1/{ARCHIVE}.body",
            f"vault2/o1/{ARCHIVE}.body",
        ]:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=b"x")
        self.assertEqual(list(self.store.list()), [])

    def test_multipart_only_when_large(self) -> None:
        """Three parts go up as a multipart upload (ETag "...-3"); a blob of
        one part or less is a single PUT (plain ETag)."""
        piece = os.urandom(1 << 20)
        writer = self.store.writer(OWNER, ARCHIVE)
        for _ in range(2 * (PART_BYTES >> 20) + 1):
            writer.write(memoryview(piece))
        self.assertEqual(writer.commit(), 2 * PART_BYTES + len(piece))
        head = self.client.head_object(Bucket=self.bucket, Key=self.store.key(OWNER, ARCHIVE))
        self.assertTrue(head["ETag"].strip('"').endswith("-3"), head["ETag"])
        self.assertEqual(head["ContentLength"], 2 * PART_BYTES + len(piece))

        writer = self.store.writer(OWNER, "b" * 32)
        for _ in range(PART_BYTES >> 20):
            writer.write(piece)
        self.assertFalse(writer.multipart)
        writer.commit()
        head = self.client.head_object(Bucket=self.bucket, Key=self.store.key(OWNER, "b" * 32))
        self.assertNotIn("-", head["ETag"])
        self.assertEqual(self._uploads(), [])

    def test_write_copies_caller_buffer(self) -> None:
        buffer = bytearray(b"a" * 1000)
        writer = self.store.writer(OWNER, ARCHIVE)
        writer.write(memoryview(buffer))
        buffer[:] = b"b" * 1000
        writer.write(memoryview(buffer))
        writer.commit()
        reader = self.store.reader(OWNER, ARCHIVE)
        self.addCleanup(reader.close)
        self.assertEqual(reader.read(5000), b"a" * 1000 + b"b" * 1000)

    def test_abort_large_writer(self) -> None:
        writer = self.store.writer(OWNER, ARCHIVE)
        writer.write(os.urandom(PART_BYTES + 1))
        self.assertTrue(writer.multipart)
        self.assertEqual(len(self._uploads()), 1)
        writer.abort()
        writer.abort()
        self.assertEqual(self._uploads(), [])
        self.assertRaises(BlobStoreError, writer.write, b"x")
        self.assertRaises(BlobStoreError, writer.commit)

    def test_failed_commit_aborts(self) -> None:
        writer = self.store.writer(OWNER, ARCHIVE)
        writer.write(os.urandom(PART_BYTES + 1))
        self.assertEqual(len(self._uploads()), 1)
        # Make completion fail: forget the parts we uploaded.
        writer._parts = [{"PartNumber": 1, "ETag": '"0123456789abcdef0123456789abcdef"'}]
        with self.assertRaises(BlobStoreError) as caught:
            writer.commit()
        self.assertIn("CompleteMultipartUpload", str(caught.exception))
        self.assertIn(self.bucket, str(caught.exception))
        self.assertEqual(self._uploads(), [])
        self.assertRaises(BlobNotFound, self.store.reader, OWNER, ARCHIVE)
        writer.abort()

    def test_part_limit(self) -> None:
        """Past S3's 10,000 parts the writer says so, instead of a server error."""
        writer = self.store.writer(OWNER, ARCHIVE)
        writer.write(os.urandom(PART_BYTES + 1))
        writer._parts.extend({"PartNumber": n, "ETag": '"x"'} for n in range(2, MAX_PARTS + 1))
        with self.assertRaises(BlobStoreError) as caught:
            writer.write(os.urandom(PART_BYTES))
        self.assertIn("10000 parts", str(caught.exception))
        writer.abort()
        self.assertEqual(self._uploads(), [])

    def test_memory_stays_flat(self) -> None:
        """64 MiB in 1 MiB pieces: the writer never holds more than one part."""
        piece = os.urandom(1 << 20)
        writer = self.store.writer(OWNER, ARCHIVE)
        most = 0
        for _ in range(64):
            writer.write(memoryview(piece))
            most = max(most, writer.buffered)
            self.assertLessEqual(writer.buffered, PART_BYTES)
        self.assertEqual(most, PART_BYTES)
        self.assertEqual(writer.commit(), 64 << 20)
        self.assertEqual(writer.buffered, 0)

    def test_remove_incomplete_layout_only(self) -> None:
        """Only uploads of our own key layout are aborted, and counted."""
        ours = [self._start_upload(self.store.key(OWNER, name * 32))[0] for name in "ab"]
        others = [
            self._start_upload(key)[0]
            for key in [
                "elsewhere/o1/" + ARCHIVE + ".body",
                "vault/o1/not-an-archive.body",
                "vault2/o1/" + ARCHIVE + ".body",
            ]
        ]
        eager = S3BlobStore(self.bucket, "vault", client=self.client, incomplete_grace_seconds=0)
        self.assertEqual(eager.remove_incomplete(), 2)
        self.assertEqual(self._upload_ids(), sorted(others))
        self.assertEqual(eager.remove_incomplete(), 0)
        self.assertNotIn(ours[0], self._upload_ids())

    def test_remove_incomplete_respects_grace(self) -> None:
        """An upload older than the grace is aborted, a younger one is not
        (another node may be writing it)."""
        old = self._start_upload(self.store.key(OWNER, ARCHIVE))
        fresh = self._start_upload(self.store.key(OWNER, "b" * 32), after=old)
        client: Any = self.client
        if abs(time.time() - fresh[1]) > 3600:
            # moto 5 lists every upload as started in 2010: use the times we saw.
            client = _StartTimes(self.client, {old[0]: old[2], fresh[0]: fresh[2]})
            old, fresh = (old[0], old[2], old[2]), (fresh[0], fresh[2], fresh[2])
        store = S3BlobStore(self.bucket, "vault", client=client)
        self.assertEqual(store.remove_incomplete(), 0)  # a day's grace: both are young
        # The server cannot backdate an upload, so the clock moves on instead:
        # a day after a moment between the two starts, the first is stale.
        middle = (old[1] + fresh[1]) / 2
        later = S3BlobStore(self.bucket, "vault", client=client, clock=lambda: middle + 24 * 3600)
        self.assertEqual(later.remove_incomplete(), 1)
        self.assertEqual(self._upload_ids(), [fresh[0]])

    def _start_upload(self, key: str, after: tuple[str, float, float] | None = None) -> tuple[str, float, float]:
        """Starts a multipart upload; returns its id, its start time as the
        server lists it (later than C{after}'s: the server's clock may count
        whole seconds) and our clock's time just after."""
        for _ in range(25):
            upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
            ours = time.time()
            started = {u["UploadId"]: u["Initiated"].timestamp() for u in self._uploads()}[upload_id]
            listed_now = abs(ours - started) < 3600  # moto lists a fixed date instead
            if after is None or ours > after[2] and (started > after[1] or not listed_now):
                return upload_id, started, ours
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            time.sleep(0.2)
        self.fail("the server lists no later start time for a later upload")

    def _upload_ids(self) -> list[str]:
        return sorted(upload["UploadId"] for upload in self._uploads())

    def test_unreachable_endpoint(self) -> None:
        import boto3.session
        import botocore.config

        session = boto3.session.Session(
            aws_access_key_id="AKIASECRETKEYIDTEST",
            aws_secret_access_key="very-secret-access-key",
            region_name="us-east-1",
        )
        client = session.client(
            "s3",
            endpoint_url="http://127.0.0.1:1",
            config=botocore.config.Config(connect_timeout=1, read_timeout=1, retries={"total_max_attempts": 1}),
        )
        store = S3BlobStore("some-bucket", "p", client=client)
        attempts = [
            lambda: store.reader(OWNER, ARCHIVE),
            lambda: list(store.list()),
            lambda: store.delete(OWNER, ARCHIVE),
            lambda: store.remove_incomplete(),
            lambda: self._commit_small(store),
        ]
        for attempt in attempts:
            with self.assertRaises(BlobStoreError) as caught:
                attempt()
            message = str(caught.exception)
            self.assertIn("some-bucket", message)
            self.assertIn("EndpointConnectionError", message)
            self.assertNotIn("AKIASECRETKEYIDTEST", message)
            self.assertNotIn("very-secret-access-key", message)
            self.assertNotIn("\n", message)
        self.assertEqual(store.describe(), "s3://some-bucket/p at 127.0.0.1:1")

    @staticmethod
    def _commit_small(store: S3BlobStore) -> None:
        writer = store.writer(OWNER, ARCHIVE)
        writer.write(b"secret data")
        writer.commit()

    def test_missing_bucket(self) -> None:
        store = S3BlobStore("sv-test-no-such-bucket-here", client=self.client)
        with self.assertRaises(BlobStoreError) as caught:
            store.reader(OWNER, ARCHIVE)
        self.assertIn("NoSuchBucket", str(caught.exception))
        self.assertRaises(BlobStoreError, lambda: list(store.list()))

    def test_describe(self) -> None:
        endpoint = moto_endpoint(self)
        host = endpoint.split("://", 1)[1]
        self.assertEqual(self.store.describe(), f"s3://{self.bucket}/vault at {host}")
        plain = S3BlobStore(self.bucket, client=self.client)
        self.assertEqual(plain.describe(), f"s3://{self.bucket} at {host}")

    def test_default_client_from_environment(self) -> None:
        """Without a client, endpoint, region and credentials come from the
        AWS environment variables."""
        endpoint = moto_endpoint(self)
        environment = s3_environment(endpoint)
        names = list(environment) + ["AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"]
        saved = {name: os.environ.get(name) for name in names}

        def restore() -> None:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

        self.addCleanup(restore)
        for name in names:
            os.environ.pop(name, None)
        os.environ.update(environment)
        store = S3BlobStore.from_url(f"s3://{self.bucket}/env/")
        writer = store.writer(OWNER, ARCHIVE)
        writer.write(b"hello")
        writer.commit()
        self.assertEqual(
            self.client.get_object(Bucket=self.bucket, Key=f"env/{OWNER}/{ARCHIVE}.body")["Body"].read(), b"hello"
        )


class S3URLTests(SyncTestCase):
    def setUp(self) -> None:
        require_boto3(self)
        self.client = make_client("http://127.0.0.1:1")

    def test_good_urls(self) -> None:
        for url, bucket, prefix in [
            ("s3://bucket", "bucket", ""),
            ("s3://bucket/", "bucket", ""),
            ("s3://my.bucket-1/vault", "my.bucket-1", "vault"),
            ("s3://bucket/vault/", "bucket", "vault"),
            ("s3://bucket/a/b/c", "bucket", "a/b/c"),
        ]:
            store = S3BlobStore.from_url(url, client=self.client)
            self.assertEqual((store.bucket, store.prefix), (bucket, prefix), url)

    def test_describe_on_aws(self) -> None:
        """No endpoint host for AWS itself, and never credentials."""
        import boto3.session

        client = boto3.session.Session(
            aws_access_key_id="AKIASECRETKEYIDTEST", aws_secret_access_key="very-secret", region_name="eu-west-1"
        ).client("s3", endpoint_url="https://s3.eu-west-1.amazonaws.com")
        self.assertEqual(S3BlobStore.from_url("s3://bucket/vault/", client=client).describe(), "s3://bucket/vault")
        self.assertEqual(S3BlobStore("bucket", client=client).describe(), "s3://bucket")

    def test_bad_urls(self) -> None:
        for url in [
            "",
            "bucket/prefix",
            "http://bucket/prefix",
            "s3://",
            "s3:///prefix",
            "s3://key:secret@bucket/prefix",
            "s3://key@bucket",
            "s3://bucket/prefix?region=eu-west-1",
            "s3://bucket/prefix?",
            "s3://bucket/prefix#frag",
            "s3://bucket:9000/prefix",
            "s3://Bucket/prefix",
            "s3://b_ucket/prefix",
            "s3://ab",
            "s3://bucket/a//b",
            "s3://bucket/a/../b",
            "s3://bucket/a b",
        ]:
            with self.assertRaises(ValueError) as caught:
                S3BlobStore.from_url(url, client=self.client)
            message = str(caught.exception)
            self.assertTrue(message.endswith("."), (url, message))
            self.assertNotIn("secret", message)

    def test_hostile_names_refused_before_any_request(self) -> None:
        store = S3BlobStore("bucket", client=object())  # any request would fail
        for owner, archive_id in [("../x", ARCHIVE), (OWNER, "../" + "a" * 29), ("", ARCHIVE)]:
            self.assertRaises(ValueError, store.writer, owner, archive_id)
            self.assertRaises(ValueError, store.reader, owner, archive_id)
            self.assertRaises(ValueError, store.delete, owner, archive_id)


class _StartTimes:
    """An S3 client whose multipart upload listings give the start times we
    recorded (moto reports a fixed date); everything else passes through."""

    def __init__(self, client: Any, starts: dict[str, float]) -> None:
        self._client = client
        self._starts = starts

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def get_paginator(self, operation: str) -> Any:
        paginator = self._client.get_paginator(operation)
        if operation != "list_multipart_uploads":
            return paginator
        starts = self._starts

        class Paginator:
            def paginate(self, **kwargs: Any) -> Iterator[dict[str, Any]]:
                for page in paginator.paginate(**kwargs):
                    for upload in page.get("Uploads", ()):
                        if upload["UploadId"] in starts:
                            upload["Initiated"] = datetime.fromtimestamp(starts[upload["UploadId"]], UTC)
                    yield page

        return Paginator()
