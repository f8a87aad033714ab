"""Downloads through one verified cache: hub files, Google Drive, plain URLs.

Every download is bounded (an overall deadline, a per-read timeout, a byte cap, the
declared Content-Length) and nothing enters the cache unless it is complete and, for a
checkpoint, starts with the magic bytes of the container its variant expects: a server
that answers with an HTML page, closes early or never stops leaves no cache entry that
a later run would trust. Whether the hub can be reached is found out once per process,
by one short probe, and only when a hub file is not cached.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import re
import select
import socket
import ssl
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import DownloadError, shown
from .input_files import check_input_file

log = logging.getLogger("convert_parity")

MiB, GiB = 1 << 20, 1 << 30


def cache_root() -> Path:
    return Path(os.environ.get("CONVERT_PARITY_CACHE", Path.home() / ".cache" / "convert-parity"))


# ---- offline, forced or found out ---------------------------------------------------------

_FORCED_OFFLINE: list[str] = []  # why the CLI forced offline mode (--offline), innermost last


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def is_offline() -> bool:
    """Offline by the user's choice: --offline, CONVERT_PARITY_OFFLINE=1 or HF_HUB_OFFLINE=1.
    Only cached files are used, nothing is probed."""
    return bool(_FORCED_OFFLINE) or any(_env_true(v) for v in ("CONVERT_PARITY_OFFLINE", "HF_HUB_OFFLINE"))


def offline_reason() -> str | None:
    """Why hub files come from the cache only, as a message fragment; None when the hub
    may be used (or has not been needed yet)."""
    if _FORCED_OFFLINE:
        return f"offline ({_FORCED_OFFLINE[-1]})"
    for var in ("CONVERT_PARITY_OFFLINE", "HF_HUB_OFFLINE"):
        if _env_true(var):
            return f"offline ({var}={os.environ[var]})"
    return _PROBES.get(hub_endpoint())


@contextlib.contextmanager
def forced_offline(reason: str = "--offline"):
    """Offline for the duration, with no probe; huggingface_hub (and transformers, which
    asks it) too. Restored afterwards, so one in-process CLI call does not leak into the next."""
    import huggingface_hub.constants as hub_constants

    previous = hub_constants.HF_HUB_OFFLINE
    _FORCED_OFFLINE.append(reason)
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        _FORCED_OFFLINE.pop()
        hub_constants.HF_HUB_OFFLINE = previous


HUB_PROBE_TIMEOUT = 1.5  # seconds: DNS, connect, TLS and the first answer line, all of it
_PROBES: dict[str, str | None] = {}  # endpoint -> None (answered) or why it is unreachable


def hub_endpoint() -> str:
    import huggingface_hub.constants as hub_constants

    return hub_constants.ENDPOINT  # HF_ENDPOINT, read by huggingface_hub at import


def probe(url: str, timeout: float) -> str | None:
    """None if `url` answers an HTTP HEAD within `timeout` seconds (any status: the host is
    there), else why not. The attempt runs on a daemon thread so that DNS, which no socket
    timeout bounds, cannot hold the caller past `timeout` either."""
    outcome: list[str | None] = []

    def attempt():
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            outcome.append(None)
        except urllib.error.HTTPError:  # an answer, even 4xx/5xx: the host is reachable
            outcome.append(None)
        except Exception as err:  # noqa: BLE001 -- every other failure means "not reachable"
            reason = getattr(err, "reason", err)
            if isinstance(reason, ssl.SSLError):  # a TLS handshake is an answer: the host is there, and
                outcome.append(None)  # huggingface_hub may trust a CA bundle that urllib does not
                return
            outcome.append(f"timed out after {timeout:g} s" if isinstance(reason, TimeoutError)
                           else f"{type(reason).__name__}: {reason}")

    worker = threading.Thread(target=attempt, name="hub-probe", daemon=True)
    worker.start()
    worker.join(timeout)
    return outcome[0] if outcome else f"timed out after {timeout:g} s"


def hub_available() -> bool:
    """Whether hub files may be downloaded in this process. Forced offline: False, no
    probe. Else the hub endpoint is probed once (CONVERT_PARITY_HUB_PROBE_TIMEOUT
    seconds, default 1.5); if it does not answer, the rest of the process works offline,
    huggingface_hub and transformers included, and offline_reason() says why."""
    if is_offline():
        return False
    endpoint = hub_endpoint()
    if endpoint not in _PROBES:
        timeout = _positive_env("CONVERT_PARITY_HUB_PROBE_TIMEOUT", HUB_PROBE_TIMEOUT)
        failure = probe(endpoint, timeout)
        _PROBES[endpoint] = None if failure is None else f"hub unreachable (probe of {shown(endpoint)}: {failure})"
        if failure is not None:
            import huggingface_hub.constants as hub_constants

            hub_constants.HF_HUB_OFFLINE = True  # read at call time by huggingface_hub and transformers
    return _PROBES[endpoint] is None


# ---- limits ----------------------------------------------------------------------------------

MAX_BYTES = 8 * GiB  # several GiB above the largest checkpoint in the registry
READ_TIMEOUT = 60.0  # seconds without a byte
DEADLINE_BASE, DEADLINE_RATE = 300.0, 512 * 1024  # deadline = 300 s + size at 512 KiB/s


def _positive_env(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise DownloadError(f"{name} must be a positive number, got {shown(raw)!r}")
    return value


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    read_timeout: float
    deadline: float | None  # seconds for the whole download; None: from its size

    @classmethod
    def from_env(cls) -> "Limits":
        deadline = os.environ.get("CONVERT_PARITY_DOWNLOAD_TIMEOUT")
        return cls(max_bytes=int(_positive_env("CONVERT_PARITY_DOWNLOAD_MAX_BYTES", MAX_BYTES)),
                   read_timeout=_positive_env("CONVERT_PARITY_DOWNLOAD_READ_TIMEOUT", READ_TIMEOUT),
                   deadline=_positive_env("CONVERT_PARITY_DOWNLOAD_TIMEOUT", 0) if deadline else None)

    def seconds_for(self, size: int | None) -> float:
        """The whole download's deadline: generous for multi-GB files, but finite."""
        if self.deadline is not None:
            return self.deadline
        return DEADLINE_BASE + (size if size is not None else self.max_bytes) / DEADLINE_RATE

    def too_large(self, url: str, what: str) -> DownloadError:
        return DownloadError(f"download of {shown(url)} {what} the size limit of {_size(self.max_bytes)} "
                             f"(CONVERT_PARITY_DOWNLOAD_MAX_BYTES); nothing was cached")

    def too_slow(self, url: str, seconds: float) -> DownloadError:
        return DownloadError(f"download of {shown(url)} did not finish within {seconds:.3g} s "
                             f"(CONVERT_PARITY_DOWNLOAD_TIMEOUT); nothing was cached")


def _size(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB" if n >= MiB else f"{n} bytes"


class _Deadline:
    """Calls `on_expire` once when the deadline passes, from a timer thread; re-armable."""

    def __init__(self, seconds: float, on_expire: Callable[[], None]):
        self.start, self.expired, self._on_expire, self._timer = time.monotonic(), False, on_expire, None
        self.rearm(seconds)

    def rearm(self, seconds_from_start: float) -> None:
        self.stop()
        self.seconds = seconds_from_start
        self._timer = threading.Timer(max(0.0, self.start + seconds_from_start - time.monotonic()), self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        self.expired = True
        self._on_expire()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class _Sockets:
    """Every socket one download opens (redirects included), as duplicates: shutting a
    duplicate down wakes a read blocked on the original, through TLS too."""

    def __init__(self):
        self._dups: list[socket.socket] = []
        self._lock = threading.Lock()
        self.closed = False

    def create_connection(self, *args, **kwargs) -> socket.socket:
        sock = socket.create_connection(*args, **kwargs)
        with self._lock:
            self._dups.append(sock.dup())
            if self.closed:
                self._shut(self._dups[-1])
        return sock

    @staticmethod
    def _shut(dup: socket.socket) -> None:
        with contextlib.suppress(OSError):
            dup.shutdown(socket.SHUT_RDWR)

    def shutdown(self) -> None:
        with self._lock:
            self.closed = True
            for dup in self._dups:
                self._shut(dup)

    def last(self) -> socket.socket | None:
        return self._dups[-1] if self._dups else None

    def close(self) -> None:
        for dup in self._dups:
            dup.close()


def _opener(sockets: _Sockets) -> urllib.request.OpenerDirector:
    def watched(connection_class):
        class Watched(connection_class):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self._create_connection = sockets.create_connection

        return Watched

    class HTTP(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(watched(http.client.HTTPConnection), req)

    class HTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(watched(http.client.HTTPSConnection), req, context=self._context)

    return urllib.request.build_opener(HTTP(), HTTPS())


# ---- what a download must be -------------------------------------------------------------------

def _is_pickle(head: bytes) -> bool:
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5  # PROTO opcode, protocol 2-5


CONTAINER_MAGIC: dict[str, tuple[str, Callable[[bytes], bool]]] = {
    # torch.save: a zip archive since torch 1.6, a pickle (protocol 2 by default) before
    "torch": ("a torch checkpoint (a zip archive or a pickle)",
              lambda head: head.startswith(b"PK\x03\x04") or _is_pickle(head)),
    # flax.serialization.msgpack_serialize of a dict: a fixmap, map16 or map32. Not the empty
    # fixmap 0x80, which no checkpoint is and which is how every pickle (PROTO) starts.
    "flax_msgpack": ("a Flax msgpack checkpoint (a msgpack map)",
                     lambda head: bool(head) and (0x81 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF))),
    "haiku_pickle": ("a Haiku checkpoint (a pickle)", _is_pickle),
}


def container_problem(path: Path, container: str | None) -> str | None:
    """Why the file at `path` cannot be a `container` file, judged by its first bytes; None
    if it may be (or no container is expected: videos, label files)."""
    if container not in CONTAINER_MAGIC:
        return None
    with open(path, "rb") as fh:
        head = fh.read(16)
    description, matches = CONTAINER_MAGIC[container]
    if matches(head):
        return None
    html = " (an HTML page: a login or error page?)" if head.lstrip()[:1] == b"<" else ""
    return f"is not {description}: it starts with {shown(repr(head))}{html}"


def _check_response(url: str, resp, limits: Limits) -> int | None:
    """The declared length, after refusing what must not be read at all."""
    content_type = resp.headers.get("Content-Type", "")
    if content_type.split(";")[0].strip().lower() == "text/html":
        raise DownloadError(f"download of {shown(url)}: the server sent an HTML page, not a checkpoint "
                            f"(a login or error page?); nothing was cached")
    declared = resp.headers.get("Content-Length")
    if declared is None or resp.headers.get("Transfer-Encoding"):
        return None
    if not declared.strip().isdigit():
        raise DownloadError(f"download of {shown(url)} declares a Content-Length of {shown(declared)!r}; "
                            f"nothing was cached")
    if int(declared) > limits.max_bytes:
        raise limits.too_large(url, f"declares {int(declared)} bytes, above")
    return int(declared)


def _more_after_body(resp, sockets: _Sockets, wait: float) -> bool:
    """Whether the server sends anything after the declared body (it was asked to close)."""
    dup = sockets.last()
    if resp.fp is None or dup is None:
        return False
    with contextlib.suppress(OSError, ValueError):
        if select.select([dup], [], [], wait)[0]:
            return bool(resp.fp.read1(1))
    return False


def _stream_url(url: str, dest: Path, progress: bool) -> None:
    """Stream `url` into `dest` within the limits (Limits.from_env()), or raise DownloadError."""
    from tqdm.auto import tqdm

    limits = Limits.from_env()
    sockets = _Sockets()
    # Headers (and redirects) within one read timeout; then the whole body within its deadline.
    deadline = _Deadline(min(limits.read_timeout, limits.seconds_for(None)), sockets.shutdown)
    received = 0
    try:
        with _opener(sockets).open(url, timeout=limits.read_timeout) as resp, open(dest, "wb") as out:
            declared = _check_response(url, resp, limits)
            deadline.rearm(limits.seconds_for(declared))
            with tqdm(total=declared, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar:
                while block := resp.read1(MiB):  # one socket read at a time: the checks run between reads
                    received += len(block)
                    if received > limits.max_bytes:
                        raise limits.too_large(url, "exceeds")
                    out.write(block)
                    bar.update(len(block))
            if deadline.expired:  # a shut-down socket reads as the end of the body
                raise limits.too_slow(url, deadline.seconds)
            if declared is not None and received < declared:
                raise DownloadError(f"download of {shown(url)} ended after {received} of the {declared} bytes "
                                    f"the server declared; nothing was cached")
            if declared is not None and _more_after_body(resp, sockets, min(1.0, limits.read_timeout)):
                raise DownloadError(f"download of {shown(url)} sent more than the {declared} bytes "
                                    f"the server declared; nothing was cached")
    except DownloadError:
        raise
    except Exception as err:
        if deadline.expired:
            raise limits.too_slow(url, deadline.seconds) from err
        if isinstance(getattr(err, "reason", err), TimeoutError):
            raise DownloadError(f"download of {shown(url)} stalled: no data for {limits.read_timeout:g} s "
                                f"(CONVERT_PARITY_DOWNLOAD_READ_TIMEOUT); nothing was cached") from err
        raise
    finally:
        deadline.stop()
        sockets.close()


def _gdown_fetch(dest: Path, progress: bool, **source) -> None:
    """gdown (Google Drive's confirmation pages, cookies) under the same limits: per-read
    timeout, byte cap (through its progress callback), and the deadline through its cancel
    event. Not bounded by the deadline: DNS and connection/TLS setup, which gdown's cancel
    does not interrupt (its per-read timeout still applies to the connect)."""
    import gdown
    from gdown.exceptions import DownloadCancelled

    limits = Limits.from_env()
    url = source.get("url") or f"Google Drive file {source.get('id')}"
    cancel = threading.Event()
    deadline = _Deadline(limits.seconds_for(None), cancel.set)
    sized = []

    def check(received: int, total: int | None) -> None:
        if total is not None and not sized:
            sized.append(total)
            if total > limits.max_bytes:
                raise limits.too_large(url, f"declares {total} bytes, above")
            deadline.rearm(limits.seconds_for(total))
        if received > limits.max_bytes:
            raise limits.too_large(url, "exceeds")

    try:
        with open(dest, "wb") as out:
            if gdown.download(output=out, quiet=not progress, progress=check, timeout=limits.read_timeout,
                              cancel=cancel, **source) is None:
                raise DownloadError(f"gdown could not download {shown(url)}")
    except DownloadCancelled as err:
        raise limits.too_slow(url, deadline.seconds) from err
    finally:
        deadline.stop()


def _download_drive(file_id: str, dest: Path, progress: bool) -> None:
    _gdown_fetch(dest, progress, id=file_id)


# ---- the cache ---------------------------------------------------------------------------------

def parse_hub_url(url: str) -> tuple[str, str, str, str] | None:
    """(repo_type, repo_id, revision, filename) for hf:// and huggingface.co URLs."""
    if url.startswith("hf://"):
        parts = url[5:].split("/")
        repo_type = "model"
        if parts[0] in ("datasets", "spaces"):
            repo_type, parts = parts[0][:-1], parts[1:]
        return repo_type, "/".join(parts[:2]), "main", "/".join(parts[2:])
    m = re.match(r"https://huggingface\.co/(datasets/|spaces/)?([^/]+/[^/]+)/(?:resolve|blob)/([^/]+)/(.+)", url)
    if m:
        repo_type = m.group(1)[:-2] if m.group(1) else "model"
        return repo_type, m.group(2), m.group(3), m.group(4)
    return None


def parse_drive_id(url: str) -> str | None:
    m = re.search(r"drive\.google\.com/(?:.*?/)?(?:file/d/|(?:open|uc)\?(?:.*&)?id=)([\w-]+)", url)
    return m.group(1) if m else None


def is_url(location: str | os.PathLike) -> bool:
    return "://" in str(location)


def cache_path_for(url: str, filename: str | None = None) -> Path:
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    name = filename or Path(urllib.parse.urlparse(url).path).name or "download"
    return cache_root() / digest / name


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(Path(root).resolve())
    except OSError:
        return False


def discard_cached(path: Path) -> Path | None:
    """Remove a download cache entry (ours with its .sha256, or a hub cache file with its
    blob) so that it is never reused; the path removed, or None if `path` is in no cache."""
    path = Path(path)
    if path.parent.parent == cache_root() and _inside(path, cache_root()):
        _sidecar(path).unlink(missing_ok=True)  # first: an entry never exists unverifiable
        path.unlink(missing_ok=True)
        return path
    from huggingface_hub.constants import HF_HUB_CACHE

    if _inside(path, Path(HF_HUB_CACHE)):
        blob = path.resolve()
        path.unlink(missing_ok=True)  # the snapshot's symlink (or copy), then what it points at
        if _inside(blob, Path(HF_HUB_CACHE)):
            blob.unlink(missing_ok=True)
        return path
    return None


def _verify_cached(path: Path, url: str, expected_sha256: str | None, container: str | None) -> Path:
    recorded = _sidecar(path)
    want = expected_sha256 or (recorded.read_text().split()[0] if recorded.exists() else None)
    if want:
        got = sha256_file(path)
        if got != want:
            raise DownloadError(f"cached file {path} for {shown(url)} has sha256 {got}, expected {want}; "
                                f"delete it to download again")
    if problem := container_problem(path, container):
        discard_cached(path)
        raise DownloadError(f"cached file {path} for {shown(url)} {problem}; removed the cached copy, "
                            f"it will be downloaded again")
    return path


def fetch(location: str | os.PathLike, *, filename: str | None = None, sha256: str | None = None,
          progress: bool = True, downloader: Callable[[str, Path, bool], None] | None = None,
          container: str | None = None) -> Path:
    """A local path for `location`: a file path, an hf:// or huggingface.co URL,
    a Google Drive link, or a plain http(s) URL.

    Downloads land in a temporary file beside their cache entry and are renamed into
    place only when complete (within Limits.from_env()), when their sha256 matches the
    one expected, and, given the `container` a checkpoint must be in ("torch",
    "flax_msgpack", "haiku_pickle"), when its first bytes are that container's. The
    sha256 is recorded next to the file and checked on every later use. Offline
    (--offline, HF_HUB_OFFLINE=1 or CONVERT_PARITY_OFFLINE=1) only cached files are used.
    """
    location = str(location)
    if not is_url(location):
        path = Path(location).expanduser()
        check_input_file(path)
        return path

    hub = parse_hub_url(location)
    if hub is not None:
        return _fetch_hub(location, *hub, container=container)

    dest = cache_path_for(location, filename)
    if dest.exists():
        return _verify_cached(dest, location, sha256, container)
    if is_offline():
        raise DownloadError(f"offline and not cached: {shown(location)} (expected at {dest})")
    drive_id = parse_drive_id(location)
    if downloader is None:
        downloader = (lambda _u, d, p: _download_drive(drive_id, d, p)) if drive_id else _stream_url
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            downloader(location, tmp, progress)
        except DownloadError:
            raise
        except Exception as err:
            raise DownloadError(f"download failed for {shown(location)} (cache path {dest}): "
                                f"{type(err).__name__}: {shown(err)}") from err
        if problem := container_problem(tmp, container):
            raise DownloadError(f"download of {shown(location)} {problem}; nothing was cached")
        got = sha256_file(tmp)
        if sha256 and got != sha256:
            raise DownloadError(f"download of {shown(location)} has sha256 {got}, expected {sha256}; "
                                f"nothing was cached")
        # The hash is recorded before the file appears: a cache entry never exists unverifiable.
        _sidecar(dest).write_text(f"{got}  {dest.name}\n")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            dest.parent.rmdir()  # only if empty: a failed first download leaves no directory
    return dest


def _is_cached(url: str) -> bool:
    """Whether `url` has a local copy fetch() would use offline; looks, never downloads."""
    if not is_url(url):
        return Path(url).expanduser().is_file()
    hub = parse_hub_url(url)
    if hub is None:
        return cache_path_for(url).exists()
    from huggingface_hub import try_to_load_from_cache

    repo_type, repo_id, revision, filename = hub
    return isinstance(try_to_load_from_cache(repo_id, filename, revision=revision, repo_type=repo_type), str)


def cached_only(urls) -> list[Path] | None:
    """The local copies of all `urls` (an input recipe's files), from the caches alone: no
    network, no hub probe, whatever the user's settings (forced offline). None if any of them
    is not cached. A cached copy is verified as fetch() verifies it: one whose recorded sha256
    no longer matches raises DownloadError (a damaged cache is not a missing file)."""
    if not all(_is_cached(url) for url in urls):
        return None
    with forced_offline("cached files only"):
        return [fetch(url, progress=False) for url in urls]


def _fetch_hub(url: str, repo_type: str, repo_id: str, revision: str, filename: str, *,
               container: str | None = None) -> Path:
    """The hub cache first (no network, no probe); then, if the hub answers, hf_hub_download.
    Its own per-read timeout (HF_HUB_DOWNLOAD_TIMEOUT) bounds the transfer; the size cap and
    deadline of plain URLs do not apply here. A file that is not its container is removed."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.constants import HF_HUB_CACHE

    def download(local_only: bool) -> Path:
        return Path(hf_hub_download(repo_id, filename, repo_type=repo_type, revision=revision,
                                    local_files_only=local_only))

    try:
        path = download(True)
    except Exception:  # noqa: BLE001 -- not cached (or an unreadable cache entry): go to the hub
        if not hub_available():
            raise DownloadError(f"could not get {shown(url)}: {offline_reason()}, and it is not in the "
                                f"hub cache {HF_HUB_CACHE}") from None
        try:
            path = download(False)
        except Exception as err:
            raise DownloadError(f"could not get {shown(url)} (hub cache {HF_HUB_CACHE}): "
                                f"{type(err).__name__}: {shown(err)}") from err
    if problem := container_problem(path, container):
        discard_cached(path)
        raise DownloadError(f"hub file {shown(url)} ({path}) {problem}; removed the cached copy, "
                            f"it will be downloaded again")
    return path
