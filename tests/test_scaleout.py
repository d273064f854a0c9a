"""Two real vault nodes sharing one PostgreSQL and one S3 bucket.

Each node is a C{twistd securevault} subprocess with its own data directory
(its own audit log) and the same master key; what they share goes through
the engines only: no node talks to the other.  A session made on node A is
used on node B, logout on B ends it on A, failed logins count across both,
and an upload through either is listed, downloaded and verified through the
other.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

from twisted.trial.unittest import SkipTest

from tests.support.daemon import (
    REPOSITORY,
    SyncDaemon,
    call,
    connect,
    download_sha256,
    list_files,
    login,
    raw_upload_head,
    run_admin,
    send_until_answered,
    twistd_argv,
)
from tests.support.postgres import postgres_url
from tests.support.s3 import make_bucket, moto_endpoint, s3_environment
from tests.support.testcase import SyncTestCase
from tests.support.tlsclient import PASSWORD


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class TwoNodes(SyncTestCase):
    """Two nodes on a fresh schema and bucket, user alice; C{node_options}
    are more daemon options, the same for every node."""

    node_options: tuple[str, ...] = ()

    def setUp(self) -> None:
        self.metadata = postgres_url(self)
        endpoint = moto_endpoint(self)
        bucket, self.s3 = make_bucket(self)
        self.bucket = bucket
        self.blobs = f"s3://{bucket}/vault"
        for name, value in s3_environment(endpoint).items():  # the nodes inherit os.environ
            self.patch(os, "environ", {**os.environ, name: value})
        self.base = self.make_dir()
        self.certs = self.base / "certs"
        shared = self.base / "shared"
        result = run_admin("--data-dir", str(shared), "init", "--certs-dir", str(self.certs), cwd=self.base)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.master_key = self.base / "shared-keys" / "master.key"  # init's default beside "shared"
        result = self.admin("user", "add", "alice", "--password-stdin", stdin=PASSWORD + "\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.nodes = [self.start_node(name) for name in ("a", "b")]
        self.ports = [node.wait_listening() for node in self.nodes]
        self.context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.certs / "ca.crt"))
        self.context.load_cert_chain(str(self.certs / "client.crt"), str(self.certs / "client.key"))

    def admin(self, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return run_admin(
            "--data-dir", str(self.base / "shared"), "--metadata", self.metadata, "--blobs", self.blobs, *argv,
            stdin=stdin, cwd=self.base,
        )  # fmt: skip

    def start_node(self, name: str, *extra: str) -> SyncDaemon:
        """Node C{name} with C{node_options}, then C{extra} options."""
        data = self.base / f"node-{name}"
        argv = twistd_argv(
            self.certs, data,
            "--metadata", self.metadata, "--blobs", self.blobs, "--master-key", str(self.master_key),
            *self.node_options, *extra,
        )  # fmt: skip
        node = SyncDaemon(argv, self.base)
        self.addCleanup(node.stop)
        return node


class TwoNodeTests(TwoNodes):
    def test_shared_sessions_archives_and_throttling(self) -> None:
        a, b = self.ports
        for node in self.nodes:
            self.assertIn(f"s3://{self.bucket}/vault", node.output())
            self.assertIn("postgresql://", node.output())
        # Login on A; the session works on B.
        session = login(self.context, a)
        self.assertEqual(list_files(self.context, b, session), [])

        # A JSON upload through A is listed and downloaded through B.
        content = os.urandom(100_000)
        body = json.dumps({"filename": "report.bin", "content": base64.b64encode(content).decode()})
        stored = call(
            self.context, a, "POST", "/upload-file", body=body.encode(),
            headers=[("Content-Type", "application/json")], session=session,
        )  # fmt: skip
        self.assertEqual(stored.status, 201, stored.body)
        first = stored.json()
        self.assertEqual([f["id"] for f in list_files(self.context, b, session)], [first["id"]])
        self.assertEqual(download_sha256(self.context, b, session, first["id"]), hashlib.sha256(content).hexdigest())

        # A raw upload of several S3 parts through B, downloaded through A.
        big = os.urandom(20 << 20)
        with connect(self.context, b) as sock:
            response = send_until_answered(sock, raw_upload_head("big.bin", len(big), session), big)
        self.assertEqual(response.status, 201, response.body[:200])
        second = response.json()
        self.assertEqual(download_sha256(self.context, a, session, second["id"]), hashlib.sha256(big).hexdigest())
        keys = sorted(item["Key"] for item in self.s3.list_objects_v2(Bucket=self.bucket)["Contents"])
        self.assertEqual(len(keys), 2)
        self.assertTrue(all(key.startswith("vault/") and key.endswith(".body") for key in keys))
        head = self.s3.head_object(Bucket=self.bucket, Key=next(k for k in keys if second["id"] in k))
        self.assertTrue(head["ETag"].strip('"').endswith("-3"), head["ETag"])  # 8 + 8 + 4 MiB parts

        # Delete through A: gone on B.
        deleted = call(
            self.context, a, "POST", "/delete-file", body=json.dumps({"id": first["id"]}).encode(),
            headers=[("Content-Type", "application/json")], session=session,
        )  # fmt: skip
        self.assertEqual(deleted.status, 204)
        self.assertEqual([f["id"] for f in list_files(self.context, b, session)], [second["id"]])

        # Logout through B ends the session on A.
        self.assertEqual(call(self.context, b, "POST", "/logout", session=session).status, 204)
        self.assertEqual(call(self.context, a, "GET", "/get-files", session=session).status, 401)

        # Failed logins through both nodes add up: the fifth locks both.
        wrong = json.dumps({"username": "alice", "password": "wrong password"}).encode()
        statuses = [
            call(
                self.context, port, "POST", "/login", body=wrong, headers=[("Content-Type", "application/json")]
            ).status
            for port in (a, b, a, b, a)
        ]
        self.assertEqual(statuses, [401] * 5)
        for port in (a, b):
            right = json.dumps({"username": "alice", "password": PASSWORD}).encode()
            throttled = call(
                self.context, port, "POST", "/login", body=right, headers=[("Content-Type", "application/json")]
            )
            self.assertEqual(throttled.status, 429, throttled.body)

        # The admin sees the same vault: one archive, intact.
        result = self.admin("verify")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("1 archives verified, 0 failed", result.stdout)

    def test_object_store_failure_is_a_503(self) -> None:
        """The bucket gone (as in an outage): uploads get the contract's JSON
        error with Retry-After, not a traceback, and the node keeps serving."""
        a, _ = self.ports
        session = login(self.context, a)
        self.s3.delete_bucket(Bucket=self.bucket)
        self.addCleanup(self.s3.create_bucket, Bucket=self.bucket)  # for make_bucket's own cleanup
        body = json.dumps({"filename": "x.txt", "content": "aGVsbG8="}).encode()
        response = call(
            self.context, a, "POST", "/upload-file", body=body,
            headers=[("Content-Type", "application/json")], session=session,
        )  # fmt: skip
        self.assertEqual(response.status, 503, response.body)
        self.assertEqual(response.json()["error"], "unavailable")
        self.assertEqual(list_files(self.context, a, session), [])
        self.assertIn("A store is unavailable: S3", self.nodes[0].output())

    def test_user_removed_on_one_node_is_gone_on_both(self) -> None:
        a, b = self.ports
        session = login(self.context, a)
        result = self.admin("user", "remove", "alice")
        self.assertEqual(result.returncode, 0)
        for port in (a, b):
            self.assertEqual(call(self.context, port, "GET", "/get-files", session=session).status, 401)

    def test_node_restart_keeps_sessions(self) -> None:
        """Sessions live in PostgreSQL: a node restarted (or replaced behind
        the load balancer) keeps serving them."""
        a, _ = self.ports
        session = login(self.context, a)
        self.nodes[0].kill()
        restarted = self.start_node("a")
        port = restarted.wait_listening()
        self.assertEqual(list_files(self.context, port, session), [])


HAPROXY_CONFIG = REPOSITORY / "contrib" / "haproxy.cfg"


class LoadBalancerTests(TwoNodes):
    """The two nodes behind HAProxy, configured by contrib/haproxy.cfg (only
    addresses, paths and check interval changed): TLS passes through, each
    node verifies the client certificate, health checks use mutual TLS, and
    when a node dies the other serves every session."""

    def setUp(self) -> None:
        haproxy = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
        if haproxy is None:
            message = "haproxy is not installed (apt-get install haproxy)"
            if os.environ.get("SECUREVAULT_TEST_REQUIRE_BACKENDS"):
                self.fail(message)
            raise SkipTest(message)
        super().setUp()
        result = run_admin("--data-dir", str(self.base / "shared"), "cert", "client", "haproxy",
                           "--certs-dir", str(self.certs), cwd=self.base)  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stderr)
        check_pem = self.base / "check.pem"
        check_pem.write_bytes((self.certs / "haproxy.crt").read_bytes() + (self.certs / "haproxy.key").read_bytes())
        self.port = free_port()
        config = HAPROXY_CONFIG.read_text()
        replacements = {
            "bind :443": f"bind 127.0.0.1:{self.port}",
            "/etc/haproxy/vault-ca.crt": str(self.certs / "ca.crt"),
            "/etc/haproxy/vault-check.pem": str(check_pem),
            "inter 5s": "inter 300ms",
            "log stdout format raw local0": "log stdout format raw local0 notice",
        }
        for old, new in replacements.items():
            self.assertIn(old, config)
            config = config.replace(old, new)
        servers = [line for line in config.splitlines() if line.strip().startswith("server ")]
        self.assertEqual(len(servers), 3)
        config = config.replace(servers[0], f"    server node-a 127.0.0.1:{self.ports[0]}")
        config = config.replace(servers[1], f"    server node-b 127.0.0.1:{self.ports[1]}")
        config = config.replace(servers[2] + "\n", "")
        path = self.base / "haproxy.cfg"
        path.write_text(config)
        checked = subprocess.run([haproxy, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
        self.assertEqual(checked.returncode, 0, checked.stdout + checked.stderr)
        self.haproxy = subprocess.Popen(
            [haproxy, "-db", "-f", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.addCleanup(self.haproxy.wait, 10)
        self.addCleanup(self.haproxy.terminate)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            time.sleep(0.1)
        else:
            self.fail("haproxy did not listen")

    def test_through_the_load_balancer(self) -> None:
        session = login(self.context, self.port)
        for _ in range(6):
            self.assertEqual(list_files(self.context, self.port, session), [])
        for node in self.nodes:  # both served requests, and both were health-checked
            self.assertIn("GET /get-files 200 user=alice", node.output())
            self.assertIn("GET /health 200 user=-", node.output())
        # Without a client certificate, the node (not HAProxy) refuses the handshake.
        bare = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.certs / "ca.crt"))
        with self.assertRaises((ssl.SSLError, ConnectionError)):
            with connect(bare, self.port) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                if not sock.recv(1):
                    raise ConnectionResetError("closed")
        # Node A dies: once HAProxy sees it, node B serves the same session.
        self.nodes[0].kill()
        deadline = time.monotonic() + 20
        served = 0
        while served < 5 and time.monotonic() < deadline:
            try:
                self.assertEqual(list_files(self.context, self.port, session), [])
                served += 1
            except (OSError, AssertionError, ssl.SSLError):
                served = 0
                time.sleep(0.2)
        self.assertEqual(served, 5)
