"""Downloading one large file over HTTP(S): resumable, with a progress bar, checked before it gets its name.

The bytes go to ``<name>.part`` beside the final file. A cut connection is retried from where it stopped
(an HTTP ``Range`` request); a process that dies leaves the ``.part``, and the next call resumes it. A
server that ignores ``Range`` (status 200 to a ranged request) is downloaded again from the start, and this
is said. Only a complete file whose checksums match gets its final name; a mismatch removes it and says so.
MONAI's ``download_url`` cannot resume, which is why this module exists; the URLs and the MSD checksum are
still MONAI's (:mod:`cobot_med.data.sources`).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Mapping

from ..errors import CobotMedError

CHUNK = 1 << 20
USER_AGENT = "cobot-med (dataset fetch)"
PART_SUFFIX = ".part"


class DownloadError(CobotMedError):
    """A download that could not finish: the message says what happened and what a rerun will do."""


class ChecksumError(DownloadError):
    """A complete download whose checksum differs from the recorded one (the file has been removed)."""


def human_bytes(n: float | None) -> str:
    if n is None:
        return "unknown size"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"


def file_digests(path: str | Path, kinds: tuple[str, ...] = ("md5", "sha256"), progress: bool = False) -> dict[str, str]:
    """The hex digests of ``path``, all in one read."""
    hashers = {kind: hashlib.new(kind) for kind in kinds}
    size = os.path.getsize(path)
    bar = _bar(size, 0, f"checking {Path(path).name}", progress)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            for hasher in hashers.values():
                hasher.update(chunk)
            bar.update(len(chunk))
    bar.close()
    return {kind: hasher.hexdigest() for kind, hasher in hashers.items()}


def _bar(total: int | None, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1000,
                file=sys.stderr, disable=not enabled, leave=enabled, dynamic_ncols=True)


def _content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes 100-199/1000`` -> (100, 1000); ``bytes */1000`` -> (None, 1000)."""
    match = re.match(r"bytes\s+(\d+|\*)(?:-\d+)?/(\d+|\*)", value or "")
    if not match:
        return None, None
    start = None if match.group(1) == "*" else int(match.group(1))
    total = None if match.group(2) == "*" else int(match.group(2))
    return start, total


def download(url: str, path: str | Path, *, retries: int = 5, timeout: float = 60.0, backoff_s: float = 2.0,
             progress: bool = True, log: Callable[[str], None] = print,
             check_space: Callable[[int, int], None] | None = None) -> Path:
    """Download ``url`` into ``path + '.part'`` until it is complete; returns the ``.part`` path.

    Resumes an existing ``.part``. ``retries``: how many times a cut connection is resumed within this call.
    ``check_space(total, have)`` is called once the size is known (it may raise). Raises
    :class:`DownloadError` with one line (the ``.part`` is kept for the next call).
    """
    part = Path(str(path) + PART_SUFFIX)
    part.parent.mkdir(parents=True, exist_ok=True)
    attempts = 0
    total: int | None = None
    checked = False
    while True:
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        if have:
            request.add_header("Range", f"bytes={have}-")
        try:
            response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - http(s) URLs of the sources
        except urllib.error.HTTPError as err:
            if err.code == 416 and have:  # nothing left to send: the part may be complete
                _, total = _content_range(err.headers.get("Content-Range"))
                if total is None or total == have:
                    return part
                log(f"{part.name}: the server refuses to resume at {human_bytes(have)} of {human_bytes(total)}; "
                    "downloading again from the start")
                part.unlink()
                continue
            raise DownloadError(f"{url}: HTTP {err.code} {err.reason}") from None
        except (urllib.error.URLError, socket.timeout, ConnectionError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", err)
            if attempts < retries:
                attempts += 1
                log(f"{Path(path).name}: cannot reach {url} ({reason}); retry {attempts} of {retries}")
                time.sleep(backoff_s * attempts)
                continue
            raise DownloadError(f"{url}: cannot download ({reason}); "
                                + (f"{human_bytes(have)} kept in {part}, run the command again to resume"
                                   if have else "check the address, the network or the mirror")) from None
        with response:
            status = response.status
            length = response.headers.get("Content-Length")
            if status == 206:
                start, total = _content_range(response.headers.get("Content-Range"))
                if start != have:
                    log(f"{part.name}: the server resumed at {start} instead of {have}; downloading again from the start")
                    part.unlink()
                    continue
                mode = "ab"
            else:
                if have:
                    log(f"{part.name}: the server does not resume downloads (it ignored the Range request); "
                        f"downloading again from the start (the {human_bytes(have)} already here are discarded)")
                have, mode = 0, "wb"
                total = int(length) if length is not None else None
            if check_space is not None and not checked and total is not None:
                check_space(total, have)
                checked = True
            bar = _bar(total, have, Path(path).name, progress)
            received, cut = have, ""
            with open(part, mode) as out:
                while True:
                    try:
                        chunk = response.read(CHUNK)
                    except (OSError, http.client.HTTPException) as err:  # timeouts, resets, short reads
                        cut = f"connection cut at {human_bytes(received)} of {human_bytes(total)} ({type(err).__name__})"
                        break
                    if not chunk:
                        break
                    try:
                        out.write(chunk)
                    except OSError as err:
                        bar.close()
                        raise DownloadError(f"{part}: cannot write ({err.strerror or err}); "
                                            f"{human_bytes(received)} kept, run the command again to resume") from None
                    received += len(chunk)
                    bar.update(len(chunk))
            bar.close()
            if not cut:
                if total is None or received == total:
                    return part
                if received > total:
                    part.unlink()
                    raise DownloadError(f"{url}: the server sent {received} bytes for a file of {total}; removed "
                                        f"{part}, run the command again")
                cut = f"connection closed at {human_bytes(received)} of {human_bytes(total)}"
        if attempts >= retries:
            raise DownloadError(f"{url}: {cut}, after {retries} retries; {human_bytes(received)} kept in {part}, "
                                "run the command again to resume")
        attempts += 1
        log(f"{Path(path).name}: {cut}; resuming (retry {attempts} of {retries})")
        time.sleep(backoff_s * attempts)


def verify(path: Path, checksums: Mapping[str, str], unverified: Mapping[str, str], *, unverified_from: str = "",
           checksums_from: str = "", accept_unverified: bool = False, progress: bool = True,
           log: Callable[[str], None] = print) -> dict[str, str]:
    """Check ``path`` against the recorded checksums; returns its digests.

    A mismatch with a recorded value removes the file and raises :class:`ChecksumError`. Values that are not
    confirmed by an official source (``unverified``) are checked the same way, and a match is said to be one
    against an unconfirmed value; ``accept_unverified`` skips them (the digests are still printed). With no
    confirmed value and no accepted one, the file is refused (removed) unless ``accept_unverified``.
    """
    digests = file_digests(path, tuple(sorted({"md5", "sha256", *checksums, *unverified})), progress=progress)
    name = Path(str(path).removesuffix(PART_SUFFIX)).name

    for kind, expected in checksums.items():
        if digests[kind] != expected.lower():
            path.unlink()
            raise ChecksumError(f"{name}: {kind} {digests[kind]} does not match the recorded {kind} {expected}"
                                f"{f' ({checksums_from})' if checksums_from else ''}; the download is corrupt or not "
                                f"the release file: removed {path}")
    if checksums:
        log(f"{name}: {' and '.join(checksums)} match{'es' if len(checksums) == 1 else ''} "
            f"({checksums_from or 'the recorded value'})")
        return digests
    if accept_unverified:
        log(f"{name}: taken without a confirmed checksum (--accept_unverified): md5 {digests['md5']}, "
            f"sha256 {digests['sha256']}")
        return digests
    if not unverified:
        path.unlink()
        raise ChecksumError(f"{name}: no checksum is recorded for this file, so it is not trusted: removed {path} "
                            f"(its md5 was {digests['md5']}); rerun with --accept_unverified to take it as it comes")
    for kind, expected in unverified.items():
        if digests[kind] != expected.lower():
            path.unlink()
            raise ChecksumError(f"{name}: {kind} {digests[kind]} does not match the {kind} {expected} recorded from a "
                                f"third party ({unverified_from}; not confirmed by the publisher): removed {path}. If "
                                "you have checked the file another way, rerun with --accept_unverified")
    log(f"{name}: {' and '.join(unverified)} match the values recorded from third parties ({unverified_from}); "
        "they are NOT confirmed by the dataset's publisher")
    return digests


def free_space_check(folder: Path, factor: float = 2.0) -> Callable[[int, int], None]:
    """``check_space(total, have)``: refuse when ``folder``'s disk has less than ``factor`` x what is left to
    download (the archive and its unpacked files are both on disk until the archive is removed)."""

    def check(total: int, have: int) -> None:
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        free = shutil.disk_usage(existing).free
        needed = int(factor * (total - have))
        if free < needed:
            raise DownloadError(f"{folder}: {human_bytes(free)} free, but this file needs about {human_bytes(needed)} "
                                f"({human_bytes(total)} to download and as much again to unpack); free some space or "
                                "choose another --dest")

    return check
