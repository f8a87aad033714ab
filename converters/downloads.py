"""Downloads through one verified cache: hub files, Google Drive, plain URLs."""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable

from .errors import DownloadError
from .input_files import check_input_file


def cache_root() -> Path:
    return Path(os.environ.get("CONVERT_PARITY_CACHE", Path.home() / ".cache" / "convert-parity"))


def is_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes")
               for v in ("CONVERT_PARITY_OFFLINE", "HF_HUB_OFFLINE"))


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


def _verify_cached(path: Path, url: str, expected_sha256: str | None) -> Path:
    recorded = path.with_name(path.name + ".sha256")
    want = expected_sha256 or (recorded.read_text().split()[0] if recorded.exists() else None)
    if want:
        got = sha256_file(path)
        if got != want:
            raise DownloadError(f"cached file {path} for {url} has sha256 {got}, expected {want}; "
                                f"delete it to download again")
    return path


def _stream_url(url: str, dest: Path, progress: bool) -> None:
    from tqdm.auto import tqdm

    with urllib.request.urlopen(url, timeout=60) as resp, open(dest, "wb") as out:
        total = int(resp.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar:
            while block := resp.read(1 << 20):
                out.write(block)
                bar.update(len(block))


def _download_drive(file_id: str, dest: Path, progress: bool) -> None:
    import gdown

    if gdown.download(id=file_id, output=str(dest), quiet=not progress) is None:
        raise DownloadError(f"gdown could not download Google Drive file {file_id}")


def fetch(location: str | os.PathLike, *, filename: str | None = None, sha256: str | None = None,
          progress: bool = True, downloader: Callable[[str, Path, bool], None] | None = None) -> Path:
    """A local path for `location`: a file path, an hf:// or huggingface.co URL,
    a Google Drive link, or a plain http(s) URL.

    Downloads land in a temporary file beside their cache entry, are hashed and
    renamed into place only when complete; the sha256 is recorded next to the
    file and checked on every later use. Offline (HF_HUB_OFFLINE=1 or
    CONVERT_PARITY_OFFLINE=1) only cached files are used.
    """
    location = str(location)
    if "://" not in location:
        path = Path(location).expanduser()
        check_input_file(path)
        return path

    hub = parse_hub_url(location)
    if hub is not None:
        return _fetch_hub(location, *hub)

    dest = cache_path_for(location, filename)
    if dest.exists():
        return _verify_cached(dest, location, sha256)
    if is_offline():
        raise DownloadError(f"offline and not cached: {location} (expected at {dest})")
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
            raise DownloadError(f"download failed for {location} (cache path {dest}): {err}") from err
        got = sha256_file(tmp)
        if sha256 and got != sha256:
            raise DownloadError(f"download of {location} has sha256 {got}, expected {sha256}")
        # The hash is recorded before the file appears: a cache entry never exists unverifiable.
        dest.with_name(dest.name + ".sha256").write_text(f"{got}  {dest.name}\n")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _fetch_hub(url: str, repo_type: str, repo_id: str, revision: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, repo_type=repo_type, revision=revision,
                                    local_files_only=is_offline()))
    except Exception as err:
        from huggingface_hub.constants import HF_HUB_CACHE

        raise DownloadError(f"could not get {url} ({'offline, ' if is_offline() else ''}hub cache {HF_HUB_CACHE}): "
                            f"{type(err).__name__}: {err}") from err
