"""Unpacking a release archive into a dataset's layout: safe member paths, every file written atomically.

Each member's path is checked with MONAI's own ``monai.apps.utils.safe_extract_member`` (no absolute paths, no
``..``, no links), then mapped into the layout (:class:`cobot_med.data.sources.SourceFile`: ``strip`` leading
folders, or every file matching ``files`` into the folder ``to``). Each file is written under a temporary name
and renamed when complete, so an interrupted unpacking leaves no half file; run again, it skips the files
that are already there with the member's size. macOS metadata (``__MACOSX/``, ``._*``) is skipped.
"""

from __future__ import annotations

import fnmatch
import gzip
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, BinaryIO

from ..errors import CobotMedError
from ..files import TEMP_PREFIX, temporary_path


class ArchiveError(CobotMedError):
    """An archive that cannot be unpacked (corrupt, unsafe, or a format with no unpacker installed)."""


def target_of(member: str, dest: Path, strip: int = 0, to: str = "", files: str = "*") -> Path | None:
    """Where ``member`` (a path inside the archive) goes under ``dest``, or None when it is skipped."""
    path = PurePosixPath(member.replace("\\", "/"))
    name = path.name
    if not name or name.startswith("._") or "__MACOSX" in path.parts or name == ".DS_Store":
        return None
    if to:
        return dest / to / name if fnmatch.fnmatchcase(name, files) else None
    parts = path.parts[strip:]
    if not parts or not fnmatch.fnmatchcase(name, files):
        return None
    return dest.joinpath(*parts)


def _checked(member, scratch: Path) -> None:
    from monai.apps.utils import safe_extract_member

    try:
        safe_extract_member(member, str(scratch))
    except ValueError as err:
        raise ArchiveError(f"{err}; the archive is not a plain dataset release, nothing more is unpacked") from None


def _members(archive: Path, fmt: str, scratch: Path) -> Iterator[tuple[str, int, Callable[[], BinaryIO]]]:
    """(path inside the archive, size, opener) of every regular file, after the safety check."""
    if fmt == "tar":
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                _checked(member, scratch)
                if member.isfile():
                    yield member.name, member.size, (lambda m=member: tar.extractfile(m))
    elif fmt == "zip":
        with zipfile.ZipFile(archive) as zipped:
            for info in zipped.infolist():
                _checked(info, scratch)
                if not info.is_dir():
                    yield info.filename, info.file_size, (lambda i=info: zipped.open(i))
    else:
        raise ArchiveError(f"{archive}: no member reader for {fmt}")


def _unpack_7z(archive: Path, into: Path) -> None:
    """7z archives: py7zr if installed (``pip install py7zr``, the ``data`` extra), else a ``7z``/``7za`` program."""
    try:
        import py7zr
    except ImportError:
        py7zr = None
    if py7zr is not None:
        with py7zr.SevenZipFile(archive, "r") as seven:
            for name in seven.getnames():
                _checked(name, into)
            seven.extractall(path=into)
        return
    program = shutil.which("7z") or shutil.which("7za") or shutil.which("7zz")
    if program is None:
        raise ArchiveError(f"{archive.name} is a 7z archive and nothing here unpacks 7z: pip install py7zr (or "
                           "pip install 'cobot-med[data]'), or install p7zip (7z), then run the command again; "
                           "the download is kept")
    listing = subprocess.run([program, "l", "-slt", str(archive)], capture_output=True, text=True, check=False)
    if listing.returncode != 0:
        raise ArchiveError(f"{archive}: {program} cannot read it ({listing.stderr.strip() or listing.stdout.strip()})")
    for line in listing.stdout.splitlines():
        if line.startswith("Path = ") and line[7:] != str(archive):
            _checked(line[7:], into)
    done = subprocess.run([program, "x", "-y", f"-o{into}", str(archive)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ArchiveError(f"{archive}: {program} failed ({done.stderr.strip() or done.stdout.strip()})")


def extract(archive: str | Path, fmt: str, dest: str | Path, *, strip: int = 0, to: str = "", files: str = "*",
            progress: bool = True, log: Callable[[str], None] = print) -> int:
    """Unpack ``archive`` (``tar``, ``zip`` or ``7z``) into ``dest`` as mapped by ``strip`` / ``to`` + ``files``;
    returns how many files were written (files already there with the member's size are kept)."""
    from tqdm import tqdm

    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = kept = 0
    if fmt == "7z":
        scratch = dest / f"{TEMP_PREFIX}unpack-{archive.name}"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        try:
            log(f"unpacking {archive.name} ...")
            _unpack_7z(archive, scratch)
            for path in sorted(p for p in scratch.rglob("*") if p.is_file() and not p.is_symlink()):
                target = target_of(path.relative_to(scratch).as_posix(), dest, strip, to, files)
                if target is None:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)  # same file system: atomic
                written += 1
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return written
    scratch = dest / f"{TEMP_PREFIX}check"
    seen: set[Path] = set()
    try:
        bar = tqdm(desc=f"unpacking {archive.name}", unit=" files", file=sys.stderr, disable=not progress,
                   leave=progress, dynamic_ncols=True)
        for member, size, opener in _members(archive, fmt, scratch):
            target = target_of(member, dest, strip, to, files)
            if target is None:
                continue
            if target in seen:
                raise ArchiveError(f"{archive}: two members unpack to {target} (the second is {member}); not a "
                                   "release of this layout")
            seen.add(target)
            if target.is_file() and target.stat().st_size == size:
                kept += 1
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = temporary_path(target)
            try:
                with opener() as source, open(tmp, "wb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
                os.replace(tmp, target)
            finally:
                if tmp.exists():
                    tmp.unlink()
            written += 1
            bar.update(1)
        bar.close()
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise ArchiveError(f"{archive}: not a readable {fmt} archive ({type(err).__name__}: {err})") from None
    if kept:
        log(f"{archive.name}: {kept} files were already unpacked, {written} written")
    return written
