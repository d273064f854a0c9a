"""An S3 server for the tests: moto's standalone server, or a real one.

By default the first test that asks starts ONE moto server (C{moto[server]},
which speaks S3 over HTTP) for the whole test process, on a free loopback
port; it is stopped when the process exits, and it also exits by itself if
the test process dies without running its exit handlers (it watches a pipe
from us).  Each test gets its own fresh bucket, emptied and removed after it.

To run the same tests against a real S3-compatible server instead, set
C{SECUREVAULT_TEST_S3_ENDPOINT} and the usual AWS variables, for example
MinIO::

    SECUREVAULT_TEST_S3_ENDPOINT=http://127.0.0.1:9000 \\
    AWS_ACCESS_KEY_ID=minioadmin AWS_SECRET_ACCESS_KEY=minioadmin \\
    python -m twisted.trial tests.stores.test_blobs_s3

(C{AWS_DEFAULT_REGION} defaults to us-east-1.)  The credentials must be
allowed to create and delete buckets: the tests make C{sv-test-...} ones.

Without moto (or boto3) the S3 tests are skipped, unless
C{SECUREVAULT_TEST_REQUIRE_BACKENDS} is set (as in CI): then they fail.
"""

from __future__ import annotations

import atexit
import http.client
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any, NoReturn

from twisted.trial.unittest import SkipTest

ENDPOINT_VARIABLE = "SECUREVAULT_TEST_S3_ENDPOINT"
REQUIRE_VARIABLE = "SECUREVAULT_TEST_REQUIRE_BACKENDS"
MOTO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
DEFAULT_REGION = "us-east-1"
START_TIMEOUT = 20.0

# Runs moto's server, and exits as soon as our end of its stdin closes: when
# the test process ends, however it ends.
_BOOT = """
import os, sys, threading
def watch():
    try:
        while sys.stdin.buffer.read(1):
            pass
    finally:
        os._exit(0)
threading.Thread(target=watch, daemon=True).start()
from moto.server import main
main(sys.argv[1:])
"""


class _MotoServer:
    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.log_path = ""
        self.error = ""

    def start(self) -> None:
        log = tempfile.NamedTemporaryFile(prefix="securevault-moto-", suffix=".log", delete=False)
        self.log_path = log.name
        atexit.register(self.stop)
        environment = dict(os.environ)
        environment.update(MOTO_CREDENTIALS)
        environment.setdefault("AWS_DEFAULT_REGION", DEFAULT_REGION)
        for _attempt in range(3):
            port = _free_port()
            self.process = subprocess.Popen(
                [sys.executable, "-c", _BOOT, "-H", "127.0.0.1", "-p", str(port)],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                cwd=tempfile.gettempdir(),
            )
            if _wait_until_answers(self.process, port, START_TIMEOUT):
                self.url = f"http://127.0.0.1:{port}"
                log.close()
                return
            self._kill()
        log.close()
        self.error = f"moto's S3 server did not start; its log is {self.log_path}"

    def _kill(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def stop(self) -> None:
        self._kill()
        if self.log_path and not self.error:
            try:
                os.unlink(self.log_path)
            except OSError:
                pass


_server: _MotoServer | None = None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_until_answers(process: subprocess.Popen[bytes], port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            connection.request("GET", "/")
            connection.getresponse().read()
            return True
        except OSError:
            time.sleep(0.1)
        finally:
            connection.close()
    return False


def _unavailable(testcase: Any, reason: str) -> NoReturn:
    if os.environ.get(REQUIRE_VARIABLE):
        testcase.fail(f"{reason} (and {REQUIRE_VARIABLE} is set)")
    raise SkipTest(reason)


def _real_endpoint() -> str | None:
    return os.environ.get(ENDPOINT_VARIABLE) or None


def require_boto3(testcase: Any) -> None:
    """Skips (or fails, when backends are required) without boto3."""
    if importlib.util.find_spec("boto3") is None:
        _unavailable(testcase, "boto3 is not installed (pip install '.[test]' in the checkout)")


def moto_endpoint(testcase: Any) -> str:
    """The URL of the S3 server for the tests: C{SECUREVAULT_TEST_S3_ENDPOINT}
    if set, else this process's moto server, started on first use."""
    global _server
    require_boto3(testcase)
    real = _real_endpoint()
    if real is not None:
        return real.rstrip("/")
    if importlib.util.find_spec("moto") is None:
        _unavailable(testcase, "moto is not installed (pip install 'moto[server]')")
    if _server is None:
        _server = _MotoServer()
        _server.start()
    if _server.error:
        testcase.fail(_server.error)
    return _server.url


def s3_environment(endpoint: str) -> dict[str, str]:
    """The environment variables a daemon subprocess needs to reach the test
    S3 server at C{endpoint} (add them to its environment)."""
    environment = {"AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": DEFAULT_REGION}
    if _real_endpoint() is not None:
        environment["AWS_DEFAULT_REGION"] = os.environ.get("AWS_DEFAULT_REGION", DEFAULT_REGION)
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            if os.environ.get(name):
                environment[name] = os.environ[name]
    else:
        environment.update(MOTO_CREDENTIALS)
    return environment


def make_client(endpoint: str, **config: Any) -> Any:
    """A boto3 S3 client for the test server; C{config} goes to botocore's
    C{Config} (e.g. C{connect_timeout=1})."""
    import boto3.session
    import botocore.config

    environment = s3_environment(endpoint)
    session = boto3.session.Session(
        aws_access_key_id=environment.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=environment.get("AWS_SECRET_ACCESS_KEY"),
        aws_session_token=environment.get("AWS_SESSION_TOKEN"),
        region_name=environment["AWS_DEFAULT_REGION"],
        profile_name=environment.get("AWS_PROFILE"),
    )
    settings: dict[str, Any] = {"retries": {"max_attempts": 3, "mode": "standard"}, "max_pool_connections": 16}
    settings.update(config)
    return session.client("s3", endpoint_url=endpoint, config=botocore.config.Config(**settings))


def empty_bucket(client: Any, bucket: str) -> None:
    """Abort every multipart upload and delete every object in C{bucket}."""
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
        for upload in page.get("Uploads", ()):
            client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", ())]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})


def make_bucket(testcase: Any) -> tuple[str, Any]:
    """A fresh, empty bucket on the test server, removed after the test:
    returns its name and a client for it."""
    client = make_client(moto_endpoint(testcase))
    bucket = f"sv-test-{uuid.uuid4().hex[:24]}"
    region = client.meta.region_name
    if region and region != "us-east-1":
        client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": region})
    else:
        client.create_bucket(Bucket=bucket)

    def remove() -> None:
        empty_bucket(client, bucket)
        client.delete_bucket(Bucket=bucket)

    testcase.addCleanup(remove)
    return bucket, client
