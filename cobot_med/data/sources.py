"""Where the public datasets come from: their release files, what each is checked against, and how it unpacks
into the layout the bundles read (:mod:`cobot_med.data.layouts`).

- ``spleen``: MSD Task09 Spleen, one tar. Its URL and MD5 are MONAI's own (``monai.apps.DecathlonDataset``),
  read from MONAI at run time, not copied here.
- ``adome``: AbdomenCT-1K, three image zips and a 7z of masks (``resources/dataset_sources.json``). Their
  checksums come from third parties and are recorded as *unverified*: they are checked, and every use says so.
- ``segrap``: SegRap2023 needs the organisers' approval, so it has registration steps instead of files.

A mirror (``--mirror URL`` or ``$COBOT_MED_DATA_MIRROR``) replaces the scheme and host of every URL and keeps
its path: ``https://zenodo.org/records/5903099/files/X.zip`` -> ``http://mirror.local/data/records/5903099/files/X.zip``
for the mirror ``http://mirror.local/data``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from importlib import resources
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..errors import SettingsError

MIRROR_ENV = "COBOT_MED_DATA_MIRROR"
FETCHABLE = ("spleen", "adome")
REGISTRATION_ONLY = ("segrap",)
HASHES = ("md5", "sha256")


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One release file: where it is, its archive format, what it is checked against, where its members go.

    ``checksums``: values the dataset's publisher (or MONAI, for MSD) gives, by algorithm. ``unverified``:
    values we could not confirm from an official source (``unverified_from`` says where they come from).
    ``strip``: leading path parts dropped from each member; or ``to`` + ``files``: every member whose file
    name matches the pattern goes into the folder ``to`` under its file name (the archive's own folders
    dropped), the others are skipped.
    """

    name: str
    url: str
    format: str  # "tar" (any compression), "zip" or "7z"
    size: int | None = None
    checksums: dict[str, str] = dataclasses.field(default_factory=dict)
    unverified: dict[str, str] = dataclasses.field(default_factory=dict)
    unverified_from: str = ""
    checksums_from: str = ""
    strip: int = 0
    to: str = ""
    files: str = "*"

    def __post_init__(self) -> None:
        for kind in (*self.checksums, *self.unverified):
            if kind not in HASHES:
                raise ValueError(f"{self.name}: unknown checksum kind {kind!r} (known: {', '.join(HASHES)})")
        if self.format not in ("tar", "zip", "7z"):
            raise ValueError(f"{self.name}: unknown archive format {self.format!r}")


@dataclasses.dataclass(frozen=True)
class DatasetSource:
    """A dataset: its layout name, the folder it unpacks into under ``--dest``, and its files (or, for a dataset
    behind a registration, the steps a user follows instead)."""

    name: str
    title: str
    folder: str
    homepage: str
    files: tuple[SourceFile, ...] = ()
    registration: tuple[str, ...] = ()
    provenance: str = ""
    license_note: str = ""


def _recorded() -> dict[str, Any]:
    text = resources.files("cobot_med").joinpath("resources/dataset_sources.json").read_text(encoding="utf-8")
    return json.loads(text)


def spleen_source() -> DatasetSource:
    """MSD Task09 Spleen as MONAI knows it: ``DecathlonDataset.resource`` and ``.md5`` (the tar holds
    ``Task09_Spleen/dataset.json``, ``imagesTr/``, ``labelsTr/``, ``imagesTs/``)."""
    from monai.apps import DecathlonDataset

    task = "Task09_Spleen"
    url, md5 = DecathlonDataset.resource[task], DecathlonDataset.md5[task]
    return DatasetSource(
        name="spleen", title="MSD Task09 Spleen", folder=task, homepage="http://medicaldecathlon.com",
        files=(SourceFile(name=f"{task}.tar", url=url, format="tar", checksums={"md5": md5},
                          checksums_from="MONAI's monai.apps.DecathlonDataset.md5", strip=1),),
        provenance="URL and MD5 from monai.apps.DecathlonDataset (MONAI's copy of the Medical Segmentation "
                   "Decathlon release)",
        license_note="CC-BY-SA 4.0 (the Medical Segmentation Decathlon); cite Antonelli et al., Nat. Commun. 2022.")


def _file(entry: dict[str, Any]) -> SourceFile:
    extract = entry.get("extract", {})
    return SourceFile(name=entry["name"], url=entry["url"], format=entry["format"], size=entry.get("size"),
                      checksums=dict(entry.get("checksums", {})), unverified=dict(entry.get("unverified_checksums", {})),
                      unverified_from=entry.get("unverified_from", ""), strip=int(extract.get("strip", 0)),
                      to=extract.get("to", ""), files=extract.get("files", "*"))


def get_source(name: str) -> DatasetSource:
    """The source of ``spleen``, ``adome`` or ``segrap``."""
    if name == "spleen":
        return spleen_source()
    recorded = _recorded()
    if name not in recorded or name.startswith("_"):
        raise SettingsError(f"unknown dataset {name!r}: cobot-med data fetch knows {', '.join(FETCHABLE + REGISTRATION_ONLY)}")
    entry = recorded[name]
    return DatasetSource(name=name, title=entry["title"], folder=entry["folder"], homepage=entry["homepage"],
                         files=tuple(_file(f) for f in entry.get("files", [])),
                         registration=tuple(entry.get("registration", [])), provenance=entry.get("provenance", ""),
                         license_note=entry.get("license_note", ""))


def mirror_from_env(mirror: str | None) -> str | None:
    """``--mirror`` when given, else ``$COBOT_MED_DATA_MIRROR``, else None (the official hosts)."""
    return mirror or os.environ.get(MIRROR_ENV) or None


def mirrored(url: str, mirror: str | None) -> str:
    """``url`` with its scheme and host replaced by the mirror's (the mirror's own path, if any, goes first)."""
    if not mirror:
        return url
    base = urlsplit(mirror)
    if base.scheme not in ("http", "https") or not base.netloc:
        raise SettingsError(f"mirror {mirror!r} is not an http(s) URL with a host, e.g. http://mirror.local/data")
    parts = urlsplit(url)
    path = base.path.rstrip("/") + parts.path
    return urlunsplit((base.scheme, base.netloc, path, parts.query, ""))
