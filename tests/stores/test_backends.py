"""Choosing the stores: --metadata and --blobs, their defaults and errors."""

from __future__ import annotations

import builtins
import subprocess
from typing import Any

from securevault.stores.backends import (
    BackendError,
    blobs_setting,
    check_blobs_url,
    check_metadata_url,
    metadata_setting,
    open_stores,
)
from securevault.stores.blobs import LocalBlobStore
from securevault.stores.metadata import SqliteMetadataStore
from tests.support.daemon import child_environment, make_vault, twistd_argv
from tests.support.testcase import SyncTestCase


class SettingTests(SyncTestCase):
    def test_flag_then_environment_then_default(self) -> None:
        environ = {"SECUREVAULT_METADATA": "postgresql://db/vault", "SECUREVAULT_BLOBS": "s3://bucket/p"}
        self.assertEqual(metadata_setting("sqlite", environ), "sqlite")
        self.assertEqual(metadata_setting(None, environ), "postgresql://db/vault")
        self.assertEqual(blobs_setting(None, environ), "s3://bucket/p")
        self.assertIsNone(metadata_setting(None, {}))
        self.assertIsNone(blobs_setting("", {}))

    def test_good_urls(self) -> None:
        for url in (None, "sqlite", "sqlite:////var/lib/vault.db", "postgresql://u@h:5432/db", "postgres://h/db"):
            check_metadata_url(url)
        for url in (None, "file:///srv/blobs", "s3://bucket", "s3://bucket/some/prefix"):
            check_blobs_url(url)

    def test_bad_urls_are_one_line_errors(self) -> None:
        for url in ("mysql://h/db", "vault.db", "sqlite:"):
            with self.assertRaises(BackendError) as caught:
                check_metadata_url(url)
            self.assertIn("--metadata", str(caught.exception))
        for url in ("http://bucket", "/srv/blobs", "s3://", "file:"):
            with self.assertRaises(BackendError) as caught:
                check_blobs_url(url)
            self.assertIn("--blobs", str(caught.exception))


class OpenTests(SyncTestCase):
    def test_embedded_defaults(self) -> None:
        data_dir = self.make_dir() / "vault-data"
        stores = open_stores(data_dir)
        self.addCleanup(stores.close)
        self.assertIsInstance(stores.metadata, SqliteMetadataStore)
        self.assertIsInstance(stores.blobs, LocalBlobStore)
        self.assertTrue(stores.single_node)
        self.assertEqual((data_dir / "vault.db").exists(), True)
        self.assertIn(str((data_dir / "archives").resolve()), stores.describe())

    def test_explicit_embedded_paths(self) -> None:
        base = self.make_dir()
        stores = open_stores(base / "d", f"sqlite://{base}/meta.db", f"file://{base}/blobs")
        self.addCleanup(stores.close)
        self.assertTrue((base / "meta.db").exists())
        self.assertEqual(getattr(stores.blobs, "root"), base / "blobs")

    def test_missing_driver_says_what_to_install(self) -> None:
        """A missing driver's error says what to install from the checkout,
        never C{securevault[...]}: that name on the public index belongs to
        an unrelated project."""
        real_import = builtins.__import__

        def no_drivers(name: str, *args: Any, **kwargs: Any) -> Any:
            if name in ("securevault.stores.metadata_postgres", "securevault.stores.blobs_s3"):
                raise ImportError(name)
            return real_import(name, *args, **kwargs)

        self.patch(builtins, "__import__", no_drivers)
        with self.assertRaises(BackendError) as caught:
            open_stores(self.make_dir(), "postgresql://127.0.0.1:1/db")
        self.assertIn("in securevault's checkout, pip install '.[postgresql]'", str(caught.exception))
        with self.assertRaises(BackendError) as caught:
            open_stores(self.make_dir(), None, "s3://bucket/prefix")
        self.assertIn("in securevault's checkout, pip install '.[s3]'", str(caught.exception))

    def test_unreachable_postgresql_is_a_clear_error(self) -> None:
        with self.assertRaises(BackendError) as caught:
            open_stores(self.make_dir(), "postgresql://vault:secret-pw@127.0.0.1:1/vault?connect_timeout=2")
        message = str(caught.exception)
        self.assertIn("cannot open the metadata store", message)
        self.assertIn("127.0.0.1:1", message)
        self.assertNotIn("secret-pw", message)


class DaemonStartTests(SyncTestCase):
    def test_unreachable_metadata_store_ends_twistd_with_one_line(self) -> None:
        base = self.make_dir()
        certs, data = make_vault(base)
        argv = twistd_argv(
            certs, data, "--metadata", "postgresql://vault:secret-pw@127.0.0.1:1/vault?connect_timeout=2"
        )
        result = subprocess.run(argv, cwd=base, env=child_environment(), capture_output=True, text=True, timeout=60)
        self.assertNotEqual(result.returncode, 0)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if "securevault: error:" in line]
        self.assertEqual(len(errors), 1, result.stdout + result.stderr)
        self.assertIn("cannot open the metadata store", errors[0])
        self.assertNotIn("secret-pw", result.stdout + result.stderr)
        self.assertNotIn("Traceback", result.stdout + result.stderr)

    def test_malformed_blobs_setting_is_a_usage_error(self) -> None:
        base = self.make_dir()
        argv = twistd_argv(base, base, "--blobs", "ftp://somewhere")
        result = subprocess.run(argv, cwd=base, env=child_environment(), capture_output=True, text=True, timeout=60)
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("--blobs must be file:///DIR or s3://BUCKET/PREFIX", result.stdout + result.stderr)
