"""The benchmark's world: machine facts, data files, PKI and the two servers."""

from __future__ import annotations

import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
PASSWORD = "bench-password-0123"
USERNAME = "bench"
NGINX_HINT = "nginx not found: install it with `apt-get install -y nginx-light` (or nginx)"


# ---------------------------------------------------------------- machine


def in_workdir(prefix: str, workdir: str | None, keep: bool, run: Callable[[Path], int]) -> int:
    """C{run(root)} in a fresh temporary directory under C{workdir},
    removed afterwards unless C{keep} (then its path is printed)."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=workdir))
    try:
        return run(root)
    finally:
        if keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# The instructions the floor's work runs on: without SHA-NI a SHA-256 costs
# several times more CPU (3.8 against 0.8 CPU-s/GiB on this project's
# machines), so figures from machines that differ here do not compare.
CRYPTO_FLAGS = ("aes", "vaes", "pclmulqdq", "vpclmulqdq", "sha_ni", "avx2", "avx512f")


def cpu_crypto_flags(cpuinfo: str | None = None) -> str:
    """Which of L{CRYPTO_FLAGS} the CPU has and which it lacks."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "flags unknown"
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    if not flags:
        return "flags unknown"
    has = [f for f in CRYPTO_FLAGS if f in flags]
    lacks = [f for f in CRYPTO_FLAGS if f not in flags]
    return " ".join(has) + (f"; no {' '.join(lacks)}" if lacks else "")


def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", "?"))
    except Exception as error:  # pragma: no cover - reporting only
        return f"unavailable ({error.__class__.__name__})"


def nginx_version(nginx: str | None) -> str:
    if nginx is None:
        return "absent"
    out = subprocess.run([nginx, "-v"], capture_output=True, text=True)
    return (out.stderr or out.stdout).strip().replace("nginx version: ", "")


def machine_header(nginx: str | None) -> list[str]:
    curl = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    return [
        f"date:         {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"machine:      {platform.machine()} ({os.uname().sysname} {os.uname().release})",
        f"cpu:          {cpu_model()}, {os.cpu_count()} cores ({cpu_crypto_flags()})",
        f"nginx:        {nginx_version(nginx)} ({nginx or '-'})",
        f"python:       {platform.python_version()}  twisted {_version('twisted')}  "
        f"cryptography {_version('cryptography')}  {ssl.OPENSSL_VERSION}",
        f"client:       {' '.join(curl.split()[:2])} and Python http.client",
        f"memory:       {page_reporting_setting()}",
    ]


# ---------------------------------------------------------------- nginx lookup


def find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def install_nginx() -> str | None:
    print("installing nginx: apt-get update && apt-get install -y nginx", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update"], check=False, env=env)
    subprocess.run(["apt-get", "install", "-y", "nginx"], check=False, env=env)
    return find_nginx()


def nginx_has_dav(nginx: str) -> bool:
    out = subprocess.run([nginx, "-V"], capture_output=True, text=True)
    return "http_dav_module" in (out.stderr + out.stdout)


# ---------------------------------------------------------------- data files


def write_random(path: Path, size: int) -> None:
    block = 16 * MiB
    with open(path, "wb") as out:
        left = size
        while left:
            n = min(block, left)
            out.write(os.urandom(n))
            left -= n


def log_lines_block(size: int, seed: int = 1) -> bytes:
    """Distinct, realistic log lines (compress ~5-8x at deflate level 1)."""
    rng = random.Random(seed)
    paths = ["/api/v1/items", "/api/v1/users", "/static/app.js", "/login", "/health", "/api/v1/orders"]
    levels = ["INFO"] * 8 + ["WARN", "DEBUG"]
    parts: list[str] = []
    total = 0
    t = 1_700_000_000.0
    while total < size:
        t += rng.random() * 0.05
        line = (
            f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(t))}.{int(t * 1e6) % 1000000:06d}Z "
            f"{rng.choice(levels)} [worker-{rng.randrange(8)}] req={rng.getrandbits(32):08x} "
            f"method=GET path={rng.choice(paths)}/{rng.randrange(100000)} status=200 "
            f"bytes={rng.randrange(100, 90000)} elapsed_ms={rng.random() * 40:.2f}\n"
        )
        parts.append(line)
        total += len(line)
    return "".join(parts).encode("ascii")[:size]


def write_text(path: Path, size: int) -> None:
    # 8 MiB of distinct lines, repeated: deflate's window is 32 KiB, so the
    # repetition does not make it any more compressible than fresh lines.
    block = log_lines_block(min(size, 8 * MiB))
    with open(path, "wb") as out:
        left = size
        while left:
            n = min(len(block), left)
            out.write(block[:n])
            left -= n


# ---------------------------------------------------------------- process facts


def _read_status(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    values[key] = int(value.split()[0])  # kB
    except OSError:
        pass
    return values


def _stat_fields(path: str) -> list[str]:
    """The fields of a /proc stat file after the command name (which may
    hold spaces and parentheses): index 11 is utime, 12 stime, 1 the ppid."""
    return Path(path).read_text().rsplit(")", 1)[1].split()


def process_cpu() -> float:
    """This process's CPU seconds, user and system (a client's own cost)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes, every thread included.

    /proc/PID/stat of a process counts all its threads, the live ones and
    those that have exited (summing /proc/PID/task/*/stat would miss the
    latter: a helper thread that ends inside the measurement).  Child
    processes are not in it: pass them too (L{process_tree})."""
    ticks = 0
    for pid in pids:
        try:
            fields = _stat_fields(f"/proc/{pid}/stat")
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """Each live thread of C{pid}: tid -> (its /proc comm name, utime +
    stime seconds so far)."""
    threads: dict[int, tuple[str, float]] = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tids = [int(entry.name) for entry in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:
        return threads
    for tid in tids:
        try:
            fields = _stat_fields(f"/proc/{pid}/task/{tid}/stat")
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
            threads[tid] = (comm, (int(fields[11]) + int(fields[12])) / tick)
        except (OSError, IndexError, ValueError):
            pass
    return threads


PAGE_REPORTING = Path("/sys/module/page_reporting/parameters")


def host_reclaimed_kib() -> int | None:
    """KiB of freed guest memory handed back to the host so far (virtio
    balloon free page reporting, as this kernel counts it); None where the
    kernel does not say.  A page handed back faults in on the host the next
    time the guest writes it: the page cache of a new file, for one."""
    try:
        return int((PAGE_REPORTING / "reported_kib").read_text())
    except (OSError, ValueError):
        return None


def disk_read_kib() -> int | None:
    """KiB read from block devices so far, whole machine (/proc/vmstat
    pgpgin): a download whose blob left the page cache reads it again."""
    try:
        for line in Path("/proc/vmstat").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == "pgpgin":
                return int(value)
    except (OSError, ValueError):
        pass
    return None


DAMON = Path("/sys/kernel/mm/damon/admin/kdamonds")


def proactive_reclaim_setting() -> str | None:
    """Whether DAMON pages out memory nobody touched for a while (cold page
    cache: a blob downloaded a minute after the last read is read from disk
    again), for the bench's header; None when it does not."""
    for kdamond in sorted(DAMON.glob("[0-9]*")):
        try:
            if (kdamond / "state").read_text().strip() != "on":
                continue
            for context in sorted(kdamond.glob("contexts/[0-9]*")):
                aggregation = int((context / "monitoring_attrs/intervals/aggr_us").read_text())
                for scheme in sorted(context.glob("schemes/[0-9]*")):
                    if (scheme / "action").read_text().strip() != "pageout":
                        continue
                    age = int((scheme / "access_pattern/age/min").read_text())
                    quota = int((scheme / "quotas/bytes").read_text())
                    return (
                        f"DAMON pages out memory idle {age * aggregation / 1e6:.0f} s or more (<= {quota // MiB} MiB/s)"
                    )
        except (OSError, ValueError):
            continue
    return None


def page_reporting_setting() -> str:
    """How eagerly freed pages go back to the host, and whether cold pages
    are reclaimed, for the bench's header."""
    reclaim = proactive_reclaim_setting()
    if host_reclaimed_kib() is None:
        return "no free page reporting counter" + (f"; {reclaim}" if reclaim else "")
    values = []
    for name in ("page_reporting_order", "min_free_ms"):
        try:
            values.append(f"{name}={(PAGE_REPORTING / name).read_text().strip()}")
        except OSError:
            pass
    reporting = "virtio-balloon free page reporting on (" + ", ".join(values) + ")"
    return reporting + (f"; {reclaim}" if reclaim else "")


def durable_write_rate(directory: Path, nbytes: int) -> float:
    """MB/s of writing C{nbytes} through securevault's own local blob store
    (1 MiB writes from one buffer, its writeback every MiB, then its commit:
    fsync, rename, directory fsync -- what an upload's 201 waits for), into
    a scratch store under C{directory}, removed afterwards.  The disk's
    bound on a durable upload, whatever the CPU; nginx does not fsync."""
    from securevault.stores.blobs import LocalBlobStore  # read-only use of the package

    root = directory / f"durable-write-{os.getpid()}"
    store = LocalBlobStore(root)
    block = os.urandom(MiB)
    try:
        start = time.perf_counter()
        writer = store.writer("bench", "0" * 32)
        for _ in range(0, nbytes, MiB):
            writer.write(block)
        written = writer.commit()
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return written / seconds / 1e6


def open_files(pid: int | str, suffix: str) -> tuple[int, int]:
    """How many files whose name ends with C{suffix} process C{pid} holds
    open: (for writing, for reading only), from /proc/PID/fd and the access
    mode in /proc/PID/fdinfo."""
    writing = reading = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if not os.readlink(fd).endswith(suffix):
                continue
            flags = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text().split("flags:", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # closed while listed
        if int(flags, 8) & os.O_ACCMODE == os.O_RDONLY:
            reading += 1
        else:
            writing += 1
    return writing, reading


def children_of(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(_stat_fields(f"/proc/{entry.name}/stat")[1]) == pid:
                    kids.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                pass
    return kids


def process_tree(pid: int) -> list[int]:
    """C{pid} and all its descendants, C{pid} first: a server's processes,
    however many workers it forks."""
    tree = [pid]
    for member in tree:  # grows while it is walked: breadth first
        tree.extend(kid for kid in children_of(member) if kid not in tree)
    return tree


class PeakRss:
    """Peak resident memory (MiB) of a set of processes during a block.

    VmRSS of all the processes is sampled every 50 ms: the peak of the sum
    (L{mib}) and each process's own peak (L{per_process_mib}).  VmHWM of
    each process is read before and after: when a process's lifetime peak
    rose during the block, that new peak was reached inside it and is
    exact (for a single process, the sum too).
    """

    def __init__(self, pids: list[int], interval: float = 0.05) -> None:
        self.pids = list(pids)
        self.interval = interval
        self.peak_kb = 0
        self.peak_by_pid: dict[int, int] = dict.fromkeys(self.pids, 0)
        self._hwm_before: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        total = 0
        for pid in self.pids:
            rss = _read_status(pid).get("VmRSS", 0)
            self.peak_by_pid[pid] = max(self.peak_by_pid[pid], rss)
            total += rss
        self.peak_kb = max(self.peak_kb, total)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakRss:
        self._hwm_before = {pid: _read_status(pid).get("VmHWM", 0) for pid in self.pids}
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        for pid in self.pids:
            hwm = _read_status(pid).get("VmHWM", 0)
            if hwm > self._hwm_before.get(pid, 0):
                self.peak_by_pid[pid] = max(self.peak_by_pid[pid], hwm)
        if len(self.pids) == 1:
            self.peak_kb = max(self.peak_kb, self.peak_by_pid[self.pids[0]])

    @property
    def mib(self) -> float:
        return self.peak_kb / 1024

    @property
    def per_process_mib(self) -> float:
        """The largest single process's peak: the per-worker figure."""
        return max(self.peak_by_pid.values(), default=0) / 1024


def rss_mib(pids: list[int]) -> float:
    return sum(_read_status(pid).get("VmRSS", 0) for pid in pids) / 1024


# ---------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; log {log}:\n{_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server did not listen on {port} within {timeout:.0f} s; log {log}:\n{_tail(log)}")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_process(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@dataclass
class Workspace:
    root: Path
    size: int
    text_size: int
    small_size: int = 100 * MiB
    # --metadata/--blobs for the admin and the daemon (empty: embedded stores)
    store_args: list[str] = field(default_factory=list)
    certs: Path = field(init=False)
    data: Path = field(init=False)

    def __post_init__(self) -> None:
        self.certs = self.root / "certs"
        self.data = self.root / "vault-data"

    @property
    def big(self) -> Path:
        return self.root / "big.bin"

    @property
    def text(self) -> Path:
        return self.root / "text.log"

    @property
    def small(self) -> Path:
        return self.root / "small.bin"

    @property
    def ca(self) -> Path:
        return self.certs / "ca.crt"

    @property
    def client_cert(self) -> Path:
        return self.certs / "client.crt"

    @property
    def client_key(self) -> Path:
        return self.certs / "client.key"

    def admin(self, *args: str, stdin: str | None = None) -> None:
        cmd = [sys.executable, "-m", "securevault.admin.cli", "--data-dir", str(self.data), *self.store_args, *args]
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        out = subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=env, cwd=self.root)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {out.stderr.strip()}")

    def prepare(self) -> None:
        self.admin("init", "--certs-dir", str(self.certs))
        self.admin("user", "add", USERNAME, "--password-stdin", stdin=PASSWORD + "\n")
        for name in ("client.crt", "client.key", "server.crt", "server.key", "ca.crt"):
            if not (self.certs / name).exists():
                raise RuntimeError(f"securevault.admin.cli init did not create {self.certs / name}")
        write_random(self.big, self.size)
        write_random(self.small, self.small_size)
        write_text(self.text, self.text_size)


class Securevault:
    name = "securevault"

    def __init__(
        self,
        ws: Workspace,
        extra_args: Sequence[str] = (),
        preexec_fn: Callable[[], None] | None = None,
        workers: int = 1,
    ) -> None:
        """C{extra_args} are more daemon options (``--quota 1000000``);
        C{preexec_fn} runs in the child before exec (``setrlimit``);
        C{workers} > 1 passes ``--workers N`` (the multi-process daemon)."""
        self.ws = ws
        self.workers = workers
        self.port = free_port()
        self.log = ws.root / "securevault.log"
        self.proc: subprocess.Popen | None = None
        self.extra_args = list(extra_args)
        self.preexec_fn = preexec_fn

    def start(self) -> None:
        ws = self.ws
        cmd = [
            # twisted.scripts.twistd has no __main__ guard, so "-m" would
            # import it and exit; call its run() as the twistd script does.
            sys.executable,
            "-c",
            "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile=",
            "securevault",
            "--port",
            str(self.port),
            "--interface",
            "127.0.0.1",
            "--cert",
            str(ws.certs / "server.crt"),
            "--key",
            str(ws.certs / "server.key"),
            "--ca-cert",
            str(ws.ca),
            "--data-dir",
            str(ws.data),
            *ws.store_args,
            *(["--workers", str(self.workers)] if self.workers > 1 else []),
            *self.extra_args,
        ]
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        # The log is shared by every daemon the bench starts: read only
        # what this one writes.
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ws.root,
                env=env,
                stdin=subprocess.DEVNULL,
                preexec_fn=self.preexec_fn,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = "\n".join(self._new_log(offset).splitlines()[-20:])
                if self.workers > 1 and "--workers not recognized" in tail:
                    raise RuntimeError(
                        f"this securevault has no --workers option (asked for --workers {self.workers}); its log:\n{tail}"
                    )
                raise RuntimeError(f"securevault exited with {self.proc.returncode}:\n{tail}")
            if re.search(r"listening on https://", self._new_log(offset)):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"securevault did not log 'listening on' within 60 s:\n{_tail(self.log)}")
        wait_for_port(self.port, self.proc, self.log)

    def _new_log(self, offset: int) -> str:
        with open(self.log, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    @property
    def pids(self) -> list[int]:
        """The twistd process first, then any worker processes it forked."""
        assert self.proc is not None
        return process_tree(self.proc.pid)

    def stop(self) -> None:
        stop_process(self.proc)


NGINX_CONF = """\
{user}daemon off;
master_process on;
worker_processes {worker_processes};
pid {root}/nginx.pid;
error_log {root}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_max_body_size 0;
    client_body_temp_path {root}/body;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {certs}/server.crt;
        ssl_certificate_key {certs}/server.key;
        ssl_client_certificate {certs}/ca.crt;
        ssl_verify_client on;
        ssl_protocols TLSv1.2 TLSv1.3;
        location /dav/ {{
            root {root}/www;
            dav_methods PUT;
            create_full_put_path on;
        }}
        location = /small.json {{
            default_type application/json;
            return 200 '{{"files":[]}}';
        }}
    }}
}}
"""


class Nginx:
    name = "nginx"

    def __init__(self, ws: Workspace, binary: str, worker_processes: int | str = "auto") -> None:
        self.ws = ws
        self.binary = binary
        self.worker_processes = worker_processes
        self.port = free_port()
        self.root = ws.root / "nginx"
        self.conf = self.root / "nginx.conf"
        self.log = self.root / "error.log"
        self.proc: subprocess.Popen | None = None
        self._pids: list[int] = []

    def start(self) -> None:
        (self.root / "www" / "dav").mkdir(parents=True, exist_ok=True)
        (self.root / "body").mkdir(exist_ok=True)
        # The GET source: the same bytes securevault serves, without a copy.
        for source in (self.ws.big, self.ws.small):
            target = self.root / "www" / "dav" / source.name
            if not target.exists() and source.exists():
                os.link(source, target)
        user = "user root;\n" if os.geteuid() == 0 else ""
        self.conf.write_text(
            NGINX_CONF.format(
                user=user,
                root=self.root,
                port=self.port,
                certs=self.ws.certs,
                worker_processes=self.worker_processes,
            )
        )
        cmd = [self.binary, "-p", str(self.root), "-c", str(self.conf), "-e", str(self.log)]
        test = subprocess.run(cmd + ["-t"], capture_output=True, text=True)
        if test.returncode != 0:
            raise RuntimeError(f"nginx -t failed:\n{test.stderr}")
        with open(self.root / "stdout.log", "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for_port(self.port, self.proc, self.log)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            self._pids = [self.proc.pid] + children_of(self.proc.pid)
            if len(self._pids) > 1:
                break
            time.sleep(0.1)

    @property
    def pids(self) -> list[int]:
        """The master first, then its workers (looked up again each time)."""
        if self.proc is None or self.proc.poll() is not None:
            return list(self._pids)
        return process_tree(self.proc.pid)

    def stop(self) -> None:
        # SIGQUIT: graceful; SIGTERM after the timeout.
        stop_process(self.proc, signal.SIGQUIT, timeout=10)
