# -*- test-case-name: tests.server.test_plugin -*-
"""VaultConfig: the daemon's settings, frozen and typed, built from Options."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from securevault.core.sessions import DEFAULT_SESSION_IDLE_SECONDS, DEFAULT_SESSION_TTL_SECONDS

DEFAULT_PORT = 5000
DEFAULT_MAX_UPLOAD_BYTES = 16 << 30
DEFAULT_MAX_JSON_BODY_BYTES = 64 << 20
DEFAULT_IDLE_TIMEOUT_SECONDS = 60
# Resumable uploads without progress for this long are removed (--upload-expiry).
DEFAULT_UPLOAD_EXPIRY_SECONDS = 24 * 3600.0
BIND_USER_POLICIES = ("none", "cn", "san")
DEFAULT_MAX_CONNECTIONS = 4096
DEFAULT_MAX_CONNECTIONS_PER_CERT = 64
DEFAULT_MIN_BODY_RATE = 16384  # bytes per second
DEFAULT_MEMORY_BUDGET_BYTES = 512 << 20
# The CRL that 'securevault-admin init' writes beside the CA certificate.
DEFAULT_CRL_NAME = "ca.crl"


class ConfigError(ValueError):
    """A setting is invalid; the message says which and why."""


def port_from_environment(environ: Mapping[str, str]) -> int:
    """The port from C{$PORT}: unset or blank means 5000."""
    raw = environ.get("PORT", "").strip()
    if not raw:
        return DEFAULT_PORT
    return parse_port(raw, "$PORT")


def parse_port(raw: str, source: str) -> int:
    """An integer 0–65535 (0 picks a free port), else L{ConfigError}."""
    if not re.fullmatch(r"[0-9]{1,5}", raw):  # int() would take "8_080" and non-ASCII digits
        raise ConfigError(f"{source} must be a port number 0-65535, not {raw!r}")
    port = int(raw)
    if not 0 <= port <= 65535:
        raise ConfigError(f"{source} must be a port number 0-65535, not {raw!r}")
    return port


_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_size(raw: str) -> int:
    """A positive byte count, with an optional binary unit: C{1048576},
    C{500M}, C{10G}, C{64KiB}; else L{ConfigError}."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:i?B)?\s*", raw, re.IGNORECASE)
    if match is None or (match.group(2) == "" and "." in match.group(1)):
        raise ConfigError(f"not a size: {raw!r} (bytes, or with a unit: 64K, 500M, 10G)")
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    if size <= 0:
        raise ConfigError(f"not a positive size: {raw!r}")
    return size


def parse_duration(raw: str) -> float:
    """A positive duration in seconds, with an optional unit: C{90}, C{30s},
    C{15m}, C{12h}, C{7d}; else L{ConfigError}."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*", raw)
    if match is None:
        raise ConfigError(f"not a duration: {raw!r} (seconds, or with a unit: 30s, 15m, 12h, 7d)")
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if not seconds > 0:
        raise ConfigError(f"not a positive duration: {raw!r}")
    return seconds


def default_thread_count() -> int:
    """One worker per CPU, at least two, so crypto of two uploads runs in parallel."""
    return max(2, os.cpu_count() or 1)


@dataclass(frozen=True)
class VaultConfig:
    """Everything the daemon needs to know, resolved and checked."""

    port: int = DEFAULT_PORT
    interface: str = "0.0.0.0"
    cert: Path = Path("certs/server.crt")
    key: Path = Path("certs/server.key")
    ca_cert: Path = Path("certs/ca.crt")
    data_dir: Path = Path("vault-data")
    master_key: Path | None = None  # None: the default place (securevault.core.keybinding.locate_master_key)
    threads: int = 2
    session_idle: float = DEFAULT_SESSION_IDLE_SECONDS
    session_ttl: float = DEFAULT_SESSION_TTL_SECONDS
    max_upload_size: int = DEFAULT_MAX_UPLOAD_BYTES
    max_json_body: int = DEFAULT_MAX_JSON_BODY_BYTES
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT_SECONDS
    quota: int | None = None
    metrics_port: int | None = None
    audit_log: Path | None = None
    bind_user: str = "none"
    master_key_passphrase: str | None = None
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_connections_per_cert: int = DEFAULT_MAX_CONNECTIONS_PER_CERT
    min_body_rate: int = DEFAULT_MIN_BODY_RATE
    memory_budget: int = DEFAULT_MEMORY_BUDGET_BYTES
    metadata_url: str | None = None  # None: SQLite in the data directory
    blobs_url: str | None = None  # None: <data-dir>/archives
    # The CRL file; required: named by --crl (a missing one is an error),
    # else the default ca.crl beside --ca-cert, used once it exists.
    crl: Path | None = None
    crl_required: bool = False
    upload_expiry: float = DEFAULT_UPLOAD_EXPIRY_SECONDS
    workers: int = 1  # processes serving the port (--workers); more than one: under a supervisor

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> VaultConfig:
        data_dir = Path(options["data-dir"])
        master_key = options.get("master-key")
        audit_log = options.get("audit-log")
        ca_cert = Path(options["ca-cert"])
        crl = options.get("crl")
        return cls(
            port=int(options["port"]),
            interface=str(options["interface"]),
            cert=Path(options["cert"]),
            key=Path(options["key"]),
            ca_cert=ca_cert,
            data_dir=data_dir,
            master_key=Path(master_key) if master_key else None,
            threads=int(options["threads"] or default_thread_count()),
            session_idle=float(options["session-idle"]),
            session_ttl=float(options["session-ttl"]),
            max_upload_size=int(options["max-upload-size"]),
            max_json_body=int(options["max-json-body"]),
            idle_timeout=float(options["idle-timeout"]),
            quota=int(options["quota"]) if options.get("quota") is not None else None,
            metrics_port=options.get("metrics-port"),
            audit_log=Path(audit_log) if audit_log else data_dir / "audit.jsonl",
            bind_user=str(options.get("bind-user", "none")),
            master_key_passphrase=options.get("master-key-passphrase"),
            max_connections=int(options.get("max-connections", DEFAULT_MAX_CONNECTIONS)),
            max_connections_per_cert=int(options.get("max-connections-per-cert", DEFAULT_MAX_CONNECTIONS_PER_CERT)),
            min_body_rate=int(options.get("min-body-rate", DEFAULT_MIN_BODY_RATE)),
            memory_budget=int(options.get("memory-budget", DEFAULT_MEMORY_BUDGET_BYTES)),
            metadata_url=options.get("metadata"),
            blobs_url=options.get("blobs"),
            crl=Path(crl) if crl else ca_cert.parent / DEFAULT_CRL_NAME,
            crl_required=bool(crl),
            upload_expiry=float(options.get("upload-expiry", DEFAULT_UPLOAD_EXPIRY_SECONDS)),
            workers=int(options.get("workers") or 1),
        )
