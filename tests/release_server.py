"""A dataset release server on 127.0.0.1 for the fetch tests (stdlib ``http.server`` in a thread), and release
archives built from the project's phantoms in each dataset's published layout.

The server answers ``Range: bytes=N-`` with 206 and ``Content-Range``, can cut the connection part-way through a
file (``cut``: path -> bytes to send before closing, for the next ``times`` requests of it), can ignore ranges
(``ignore_range``) like servers that do not resume, and records every request (path, Range header).
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cobot_med.data.sources import DatasetSource, SourceFile


class ReleaseServer:
    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.requests: list[tuple[str, str | None]] = []
        self.cut: dict[str, tuple[int, int]] = {}  # path -> (bytes sent before closing, how many more requests)
        self.ignore_range = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                path = self.path
                server.requests.append((path, self.headers.get("Range")))
                if path not in server.files:
                    self.send_error(404, "Not Found")
                    return
                data = server.files[path]
                start = 0
                ranged = self.headers.get("Range")
                if ranged and not server.ignore_range:
                    start = int(ranged.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                limit, times = server.cut.get(path, (None, 0))
                if limit is not None and times > 0:
                    server.cut[path] = (limit, times - 1)
                    self.wfile.write(body[: max(0, limit - start)])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> "ReleaseServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def tar_bytes(entries: dict[str, bytes], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zipped:
        for name, data in entries.items():
            zipped.writestr(name, data)
    return buffer.getvalue()


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def spleen_release(phantoms: Path) -> bytes:
    """Task09_Spleen.tar as MSD publishes it: everything under Task09_Spleen/, with a macOS ``._`` file in it."""
    entries = {f"Task09_Spleen/{name}": data for name, data in files_under(phantoms).items()}
    first = next(name for name in entries if name.startswith("Task09_Spleen/imagesTr/"))
    entries[first.replace("imagesTr/", "imagesTr/._")] = b"\x00\x05\x16\x07 AppleDouble"
    return tar_bytes(entries)


def adome_release(phantoms: Path) -> dict[str, bytes]:
    """AbdomenCT-1K's release shape: images in AbdomenCT-1K-ImagePart1/ of a zip, masks in an archive of their own
    (the release's is a 7z, which the standard library cannot write: a tar.gz here)."""
    files = files_under(phantoms)
    images = {f"AbdomenCT-1K-ImagePart1/{Path(n).name}": d for n, d in files.items() if n.startswith("Image/")}
    masks = {f"Mask/{Path(n).name}": d for n, d in files.items() if n.startswith("Mask/")}
    return {"AbdomenCT-1K-ImagePart1.zip": zip_bytes(images), "Mask.tar.gz": tar_bytes(masks, "w:gz")}


def spleen_source(url: str, data: bytes, **kwargs) -> DatasetSource:
    """The spleen source as recorded (one tar, first folder stripped), at ``url``, with ``data``'s MD5 unless given."""
    checksums = kwargs.pop("checksums", {"md5": md5(data)})
    return DatasetSource(name="spleen", title="MSD Task09 Spleen (test)", folder="Task09_Spleen", homepage="",
                         files=(SourceFile(name="Task09_Spleen.tar", url=url, format="tar", checksums=checksums,
                                           checksums_from="the test's own MD5", strip=1, **kwargs),))


def adome_source(base: str, release: dict[str, bytes], unverified: dict[str, dict[str, str]] | None = None,
                 confirmed: bool = True) -> DatasetSource:
    """The adome source's shape: image zip(s) into Image/, the mask archive into Mask/."""
    files = []
    for name, data in release.items():
        kind = "zip" if name.endswith(".zip") else "tar"
        to, pattern = ("Image", "*_0000.nii.gz") if kind == "zip" else ("Mask", "Case_*.nii.gz")
        files.append(SourceFile(name=name, url=f"{base}/records/1/files/{name}?download=1", format=kind,
                                checksums={"md5": md5(data)} if confirmed else {},
                                unverified=(unverified or {}).get(name, {}), unverified_from="a test record",
                                to=to, files=pattern))
    return DatasetSource(name="adome", title="AbdomenCT-1K (test)", folder="AbdomenCT-1K", homepage="",
                         files=tuple(files))


