"""``cobot-med data fetch`` and ``data check``: a public dataset from its release files into the layout the
bundles read, checked, with the fixed split written beside it.

``fetch_dataset``: for each release file (:mod:`cobot_med.data.sources`), download it (resumable, checked:
:mod:`cobot_med.data.download`), unpack it into ``DEST/<folder>`` (:mod:`cobot_med.data.archives`), then scan
the folder in its layout and write ``DEST/<folder>/datalist.json`` with the fixed split (:data:`FIXED_SPLIT`).
What is done is recorded in ``DEST/<folder>/.cobot-med-fetch.json``, so a second call skips the files already
downloaded and unpacked. ``check_dataset``: scan a folder in its layout and put every case through the volume
chain's checks (``docs/data.md``, *Checks and errors*).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

from ..errors import CobotMedError
from ..files import absolute, write_json
from .datalist import FIXED_SPLIT, SPLITS, scan_cases, split_cases, write_datalist
from .download import download, free_space_check, human_bytes, verify
from .sources import DatasetSource, get_source, mirror_from_env, mirrored

STATE_FILE = ".cobot-med-fetch.json"
DOWNLOADS = ".downloads"
DATALIST = "datalist.json"


class FetchError(CobotMedError):
    """A dataset that cannot be fetched or does not pass its checks."""


@dataclasses.dataclass
class CheckResult:
    folder: Path
    cases: list[dict]
    left_out: list[str]  # cases without their files (scan_cases' problems)
    failures: list[dict] = dataclasses.field(default_factory=list)  # cases that failed the volume checks
    checked: int = 0  # cases put through the volume chain

    @property
    def ok(self) -> bool:
        return bool(self.cases) and not self.failures


@dataclasses.dataclass
class FetchResult:
    folder: Path
    datalist: Path
    counts: dict[str, int]
    left_out: list[str]


def _read_state(path: Path) -> dict:
    if not path.is_file():
        return {"files": {}}
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or not isinstance(state.get("files"), dict):
            raise ValueError("not a fetch record")
        return state
    except (OSError, ValueError) as err:
        raise FetchError(f"{path}: unreadable fetch record ({err}); delete it to fetch again from the start") from None


def fetch_dataset(name: str, dest: str | Path = "data", *, mirror: str | None = None, keep_archives: bool = False,
                  accept_unverified: bool = False, source: DatasetSource | None = None, retries: int = 5,
                  backoff_s: float = 2.0, timeout: float = 60.0, progress: bool = True,
                  log: Callable[[str], None] = print) -> FetchResult:
    """Fetch dataset ``name`` into ``dest/<its folder>`` and write its fixed split; see the module docstring.

    ``source`` replaces the recorded one (tests, or a site's own copy with its own checksums).
    """
    source = source or get_source(name)
    if source.registration and not source.files:
        raise FetchError(f"{source.title} cannot be downloaded without registration:\n" + registration_text(source))
    mirror = mirror_from_env(mirror)
    folder = absolute(dest) / source.folder
    if folder.exists() and not folder.is_dir():
        raise FetchError(f"{folder} is a file, not a folder; choose another --dest")
    state_path = folder / STATE_FILE
    if folder.is_dir() and not state_path.is_file() and any(folder.iterdir()):
        raise FetchError(f"{folder} exists and was not made by cobot-med data fetch; nothing in it is overwritten: "
                         f"choose another --dest, or check it as it is with cobot-med data check {name} {folder}")
    state = _read_state(state_path)
    if not state_path.is_file():  # from now on the folder is fetch's own, also after a failed download
        state["dataset"] = source.name
        write_json(state_path, state)
    log(f"fetching {source.title} into {folder}" + (f" from the mirror {mirror}" if mirror else "")
        + (f" ({source.provenance})" if source.provenance else ""))
    for number, item in enumerate(source.files, 1):
        prefix = f"[{number}/{len(source.files)}] {item.name}"
        record = state["files"].get(item.name, {})
        if record.get("unpacked"):
            log(f"{prefix}: already downloaded, checked and unpacked ({record.get('checked')})")
            continue
        archive = folder / DOWNLOADS / item.name
        if archive.is_file() and record.get("size") == archive.stat().st_size and record.get("checked"):
            log(f"{prefix}: already downloaded and checked ({record['checked']})")
        else:
            url = mirrored(item.url, mirror)
            log(f"{prefix}: downloading {url}" + (f" ({human_bytes(item.size)})" if item.size else ""))
            part = download(url, archive, retries=retries, backoff_s=backoff_s, timeout=timeout, progress=progress,
                            log=log, check_space=free_space_check(folder))
            digests = verify(part, item.checksums, item.unverified, unverified_from=item.unverified_from,
                             checksums_from=item.checksums_from, accept_unverified=accept_unverified,
                             progress=progress, log=log)
            os.replace(part, archive)
            checked = ("confirmed: " + item.checksums_from if item.checksums else
                       "taken with --accept_unverified" if accept_unverified else
                       "matches third-party checksums, not confirmed by the publisher")
            record = {"url": url, "size": archive.stat().st_size, **digests, "checked": checked,
                      "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
            state["files"][item.name] = record
            write_json(state_path, state)
        from .archives import extract

        written = extract(archive, item.format, folder, strip=item.strip, to=item.to, files=item.files,
                          progress=progress, log=log)
        record["unpacked"] = True
        record["files_written"] = written
        write_json(state_path, state)
        if keep_archives:
            log(f"{prefix}: unpacked {written} files; the archive is kept in {archive}")
        else:
            archive.unlink()
            log(f"{prefix}: unpacked {written} files; archive removed (--keep_archives keeps it)")
    leftover = folder / DOWNLOADS
    if leftover.is_dir() and not any(leftover.iterdir()):
        leftover.rmdir()
    return write_fixed_split(name, folder, log=log)


def write_fixed_split(layout: str, folder: Path, *, path: Path | None = None, say_missing: bool = True,
                      log: Callable[[str], None] = print) -> FetchResult:
    """Scan ``folder`` in ``layout``'s tree and write the fixed split (:data:`FIXED_SPLIT`) to ``path``
    (default ``folder/datalist.json``)."""
    cases, left_out = scan_cases(layout, folder)
    if not cases:
        raise FetchError(f"{folder}: no usable cases in the {layout} layout after unpacking")
    if say_missing:
        say_left_out(left_out, log)
    split = split_cases(cases, **FIXED_SPLIT)
    path = path or folder / DATALIST
    write_datalist(split, path, layout=layout, **FIXED_SPLIT)
    counts = {s: len(split[s]) for s in SPLITS}
    log(f"{len(cases)} cases in the {layout} layout; fixed split (by case, val_fraction {FIXED_SPLIT['val_fraction']}, "
        f"test_fraction {FIXED_SPLIT['test_fraction']}, seed {FIXED_SPLIT['seed']}): "
        + ", ".join(f"{s} {n}" for s, n in counts.items()) + f"; written to {path}")
    return FetchResult(folder=folder, datalist=path, counts=counts, left_out=left_out)


def say_left_out(left_out: list[str], log: Callable[[str], None]) -> None:
    if left_out:
        shown = "; ".join(left_out[:3]) + (f"; ... {len(left_out) - 3} more" if len(left_out) > 3 else "")
        log(f"{len(left_out)} case(s) left out for missing files: {shown}")


def check_dataset(layout: str, folder: str | Path, *, full: bool = True, progress: bool = True,
                  log: Callable[[str], None] = print) -> CheckResult:
    """Scan ``folder`` in ``layout``'s tree; with ``full``, load every case through the volume chain's checks
    (shape, affine, intensities, label values, ...), one progress bar, each failing case named with its
    reason. Raises :class:`~cobot_med.data.validation.DataError` for a folder that is not in the layout."""
    from .layouts import get_layout

    folder = absolute(folder)
    spec = get_layout(layout)
    cases, left_out = scan_cases(layout, folder)
    result = CheckResult(folder=folder, cases=cases, left_out=left_out)
    if not full or not cases:
        return result
    from tqdm import tqdm

    from .chains import volume_chain
    from .volume import GuardedVolume

    chain = GuardedVolume(volume_chain(spec.organ_ids, spec.ct_window, spec.modality, layout=layout))
    for case in tqdm(cases, desc=f"checking {spec.title} cases", unit=" cases", disable=not progress,
                     file=sys.stderr, dynamic_ncols=True):
        out = chain(case)
        result.checked += 1
        if "error" in out:
            result.failures.append({"case_id": case["case_id"], "error": out["error"]})
    return result


def registration_text(source: DatasetSource) -> str:
    return "\n".join(f"  {i}. {step}" for i, step in enumerate(source.registration, 1))
