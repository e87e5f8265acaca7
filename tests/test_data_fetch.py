"""``cobot-med data fetch`` / ``data check`` against a release server on 127.0.0.1 (tests/release_server.py)
serving phantom archives in each dataset's published layout: a fetch into the bundles' layout with the fixed
split, a resumed fetch after a cut connection, a checksum mismatch, a mirror; the recorded sources; SegRap's
registration steps and folder check. No other network."""

from __future__ import annotations

import json
import shutil
import socket
import tarfile

import pytest
from release_server import (ReleaseServer, adome_release, adome_source, files_under, md5, spleen_release,
                            spleen_source, tar_bytes)

from cobot_med.cli import main
from cobot_med.data.archives import ArchiveError, extract
from cobot_med.data.datalist import FIXED_SPLIT, load_datalist, scan_cases, split_cases
from cobot_med.data.download import ChecksumError, DownloadError, free_space_check
from cobot_med.data.fetch import STATE_FILE, fetch_dataset
from cobot_med.data.sources import MIRROR_ENV, get_source, mirrored


@pytest.fixture(scope="module")
def spleen_tar(phantom_factory):
    phantoms = phantom_factory("spleen", cases=5, seed=3, shape=(24, 24, 10))
    return phantoms, spleen_release(phantoms)


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: a URL there fails at once if it is ever used."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(source, dest, lines=None, **kwargs):
    kwargs.setdefault("backoff_s", 0.0)
    return fetch_dataset(source.name, dest, source=source, progress=False,
                         log=(lines.append if lines is not None else lambda line: None), **kwargs)


def test_fetch_unpacks_into_the_bundles_layout_and_writes_the_fixed_split(spleen_tar, tmp_path):
    phantoms, data = spleen_tar
    with ReleaseServer({"/Task09_Spleen.tar": data}) as server:
        result = fetch(spleen_source(f"{server.url}/Task09_Spleen.tar", data), tmp_path / "data")
        folder = tmp_path / "data" / "Task09_Spleen"
        assert result.folder == folder
        assert files_under(folder.parent / "Task09_Spleen") == {**files_under(phantoms), **{
            n: (folder / n).read_bytes() for n in ("datalist.json", STATE_FILE)}}  # byte for byte; no ._ file
        assert not (folder / ".downloads").exists()  # the archive is removed once unpacked
        cases, _ = scan_cases("spleen", folder)
        expected = split_cases(cases, **FIXED_SPLIT)
        written = load_datalist(folder / "datalist.json")
        assert {s: [c["case_id"] for c in written[s]] for s in written} == \
               {s: [c["case_id"] for c in expected[s]] for s in expected}
        assert json.loads((folder / STATE_FILE).read_text())["files"]["Task09_Spleen.tar"]["md5"] == md5(data)
        asked = len(server.requests)
        lines = []
        fetch(spleen_source(f"{server.url}/Task09_Spleen.tar", data), tmp_path / "data", lines)
        assert len(server.requests) == asked  # nothing downloaded again
        assert any("already downloaded, checked and unpacked" in line for line in lines)


def test_a_cut_connection_is_resumed_with_a_range_request(spleen_tar, tmp_path):
    phantoms, data = spleen_tar
    cut = len(data) * 2 // 5
    with ReleaseServer({"/Task09_Spleen.tar": data}) as server:
        source = spleen_source(f"{server.url}/Task09_Spleen.tar", data)
        server.cut["/Task09_Spleen.tar"] = (cut, 1)
        with pytest.raises(DownloadError, match="run the command again to resume"):
            fetch(source, tmp_path / "a", retries=0)
        part = tmp_path / "a" / "Task09_Spleen" / ".downloads" / "Task09_Spleen.tar.part"
        assert part.stat().st_size == cut and not (tmp_path / "a" / "Task09_Spleen" / "imagesTr").exists()
        fetch(source, tmp_path / "a")  # the process died; a second call resumes
        assert server.requests[-1] == ("/Task09_Spleen.tar", f"bytes={cut}-")
        assert files_under(tmp_path / "a" / "Task09_Spleen" / "imagesTr") == files_under(phantoms / "imagesTr")

        server.requests.clear()
        server.cut["/Task09_Spleen.tar"] = (cut, 1)  # within one call: resumed by the retry
        lines = []
        fetch(source, tmp_path / "b", lines, retries=1)
        assert [r[1] for r in server.requests] == [None, f"bytes={cut}-"]
        assert any("resuming (retry 1 of 1)" in line for line in lines)
        assert files_under(tmp_path / "b" / "Task09_Spleen" / "labelsTr") == files_under(phantoms / "labelsTr")

        server.requests.clear()
        server.ignore_range = True  # a server that cannot resume: the download starts again, and says so
        server.cut["/Task09_Spleen.tar"] = (cut, 1)
        lines = []
        fetch(source, tmp_path / "c", lines, retries=1)
        assert any("does not resume downloads" in line for line in lines)
        assert files_under(tmp_path / "c" / "Task09_Spleen" / "imagesTr") == files_under(phantoms / "imagesTr")


def test_a_checksum_mismatch_removes_the_file_and_says_so(spleen_tar, tmp_path, capsys):
    _, data = spleen_tar
    with ReleaseServer({"/Task09_Spleen.tar": data}) as server:
        source = spleen_source(f"{server.url}/Task09_Spleen.tar", data, checksums={"md5": "0" * 32})
        with pytest.raises(ChecksumError, match=rf"md5 {md5(data)} does not match the recorded md5 0{{32}}.*removed"):
            fetch(source, tmp_path / "data")
        folder = tmp_path / "data" / "Task09_Spleen"
        assert not any(p.is_file() and p.name != STATE_FILE for p in folder.rglob("*"))  # no archive, no part, no case

        # the command with the real record (MONAI's URL and MD5) through a mirror: the phantom tar is not MSD's
        code = main(["data", "fetch", "spleen", "--dest", str(tmp_path / "cli"), "--mirror", server.url])
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cobot-med")]
        assert code == 2 and len(err) == 1  # one line (the rest of stderr is the progress bars)
        assert err[0].startswith("cobot-med: Task09_Spleen.tar: md5 ") and "410d4a301da4e5b2f6f86ec3ddba524e" in err[0]
        assert server.requests[-1][0] == "/Task09_Spleen.tar"  # MONAI's S3 path, on the mirror's host
        assert not list((tmp_path / "cli").rglob("*.tar*"))


def test_a_mirror_replaces_the_host_and_keeps_the_path(spleen_tar, tmp_path, monkeypatch):
    phantoms, data = spleen_tar
    official = f"http://127.0.0.1:{closed_port()}/msd/Task09_Spleen.tar"
    with ReleaseServer({"/mirror/msd/Task09_Spleen.tar": data}) as server:
        fetch(spleen_source(official, data), tmp_path / "a", mirror=f"{server.url}/mirror/")
        assert server.requests == [("/mirror/msd/Task09_Spleen.tar", None)]
        monkeypatch.setenv(MIRROR_ENV, f"{server.url}/mirror")
        fetch(spleen_source(official, data), tmp_path / "b")
        assert len(server.requests) == 2
    assert files_under(tmp_path / "b" / "Task09_Spleen" / "imagesTr") == files_under(phantoms / "imagesTr")
    assert mirrored("https://zenodo.org/records/5903099/files/A.zip?download=1", "http://m.local:8080/data") == \
        "http://m.local:8080/data/records/5903099/files/A.zip?download=1"


def test_adome_release_files_unpack_into_image_and_mask(phantom_factory, tmp_path):
    phantoms = phantom_factory("adome", cases=5, seed=3, shape=(24, 24, 10))
    release = adome_release(phantoms)
    paths = {f"/records/1/files/{name}?download=1": data for name, data in release.items()}
    with ReleaseServer(paths) as server:
        lines = []
        result = fetch(adome_source(server.url, release), tmp_path / "data", lines)
        assert files_under(result.folder / "Image") == files_under(phantoms / "Image")
        assert files_under(result.folder / "Mask") == files_under(phantoms / "Mask")
        assert sum(result.counts.values()) == 5

        # checksums only from third parties: checked, and said to be unconfirmed
        third = {name: {"md5": md5(data)} for name, data in release.items()}
        lines = []
        fetch(adome_source(server.url, release, unverified=third, confirmed=False), tmp_path / "b", lines)
        assert sum("NOT confirmed by the dataset's publisher" in line for line in lines) == 2
        wrong = {name: {"md5": "f" * 32} for name in release}
        with pytest.raises(ChecksumError, match="recorded from a third party.*--accept_unverified"):
            fetch(adome_source(server.url, release, unverified=wrong, confirmed=False), tmp_path / "c")
        lines = []
        fetch(adome_source(server.url, release, unverified=wrong, confirmed=False), tmp_path / "c", lines,
              accept_unverified=True)
        assert any("taken without a confirmed checksum" in line and md5(release["Mask.tar.gz"]) in line for line in lines)
        with pytest.raises(ChecksumError, match="no checksum is recorded"):  # nothing recorded at all: not trusted
            fetch(adome_source(server.url, release, confirmed=False), tmp_path / "d")


def test_recorded_sources_say_what_is_confirmed():
    from monai.apps import DecathlonDataset

    spleen = get_source("spleen")
    assert [(f.url, f.checksums) for f in spleen.files] == [
        (DecathlonDataset.resource["Task09_Spleen"], {"md5": DecathlonDataset.md5["Task09_Spleen"]})]
    adome = get_source("adome")
    assert [f.name for f in adome.files] == ["AbdomenCT-1K-ImagePart1.zip", "AbdomenCT-1K-ImagePart2.zip",
                                             "AbdomenCT-1K-ImagePart3.zip", "Mask.7z"]
    for item in adome.files:  # nothing is claimed as confirmed; every third-party value says where it is from
        assert item.checksums == {} and item.size is None
        assert set(item.unverified) == {"md5", "sha256"} and item.unverified_from
        assert item.url.startswith("https://zenodo.org/records/")
    assert get_source("segrap").registration and not get_source("segrap").files


def test_unsafe_archives_and_7z_without_an_unpacker_are_refused(tmp_path, monkeypatch):
    evil = tmp_path / "evil.tar"
    evil.write_bytes(tar_bytes({"Task09_Spleen/../../outside.txt": b"x"}))
    with pytest.raises(ArchiveError, match="Unsafe path"):
        extract(evil, "tar", tmp_path / "dest", strip=1, progress=False)
    assert not (tmp_path / "outside.txt").exists()
    link = tmp_path / "link.tar"
    with tarfile.open(link, "w") as tar:
        info = tarfile.TarInfo("Task09_Spleen/imagesTr/a.nii.gz")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(ArchiveError, match="Symbolic link"):
        extract(link, "tar", tmp_path / "dest", strip=1, progress=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setitem(__import__("sys").modules, "py7zr", None)
    (tmp_path / "Mask.7z").write_bytes(b"7z\xbc\xaf\x27\x1c")
    with pytest.raises(ArchiveError, match="pip install py7zr"):
        extract(tmp_path / "Mask.7z", "7z", tmp_path / "dest", to="Mask", files="Case_*.nii.gz", progress=False)


def test_a_disk_without_room_is_refused_before_downloading(tmp_path):
    with pytest.raises(DownloadError, match=r"free, but this file needs about"):
        free_space_check(tmp_path)(10**18, 0)
    free_space_check(tmp_path)(1000, 0)  # a small file fits


def test_segrap_prints_the_registration_steps(capsys, tmp_path):
    assert main(["data", "fetch", "segrap", "--dest", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert "grand-challenge.org" in out and "cobot-med data check segrap DIR" in out
    assert err.strip().startswith("cobot-med: nothing was downloaded") and not list(tmp_path.iterdir())


def test_data_check_names_the_bad_case_and_writes_the_split_of_a_good_folder(phantom_factory, tmp_path, capsys):
    folder = tmp_path / "SegRap2023"
    shutil.copytree(phantom_factory("segrap", cases=4, seed=1, shape=(24, 24, 12)), folder)
    datalist = tmp_path / "datalist.json"
    assert main(["data", "check", "segrap", str(folder), "--datalist", str(datalist)]) == 0
    assert "4 cases checked, 4 pass" in capsys.readouterr().out
    assert sum(len(v) for v in load_datalist(datalist).values()) == 4
    broken = folder / "segrap_0002" / "label.nii.gz"
    broken.write_bytes(broken.read_bytes()[:200])  # truncated
    datalist.unlink()
    assert main(["data", "check", "segrap", str(folder), "--datalist", str(datalist)]) == 2
    out, err = capsys.readouterr()
    assert f"segrap_0002: {broken}: unreadable, truncated or corrupt" in out
    assert err.strip().splitlines()[-1].startswith("cobot-med: 1 of 4 cases") and not datalist.exists()
    assert main(["data", "check", "adome", str(folder)]) == 2  # not the layout: one named line
    assert "no Image/Case_XXXXX_0000.nii.gz files" in capsys.readouterr().err


def test_a_folder_not_made_by_fetch_is_never_written_into(spleen_tar, tmp_path):
    from cobot_med.data.fetch import FetchError

    _, data = spleen_tar
    own = tmp_path / "data" / "Task09_Spleen" / "imagesTr" / "spleen_1.nii.gz"
    own.parent.mkdir(parents=True)
    own.write_bytes(b"the user's own file")
    with pytest.raises(FetchError, match="was not made by cobot-med data fetch; nothing in it is overwritten"):
        fetch(spleen_source(f"http://127.0.0.1:{closed_port()}/Task09_Spleen.tar", data), tmp_path / "data")
    assert own.read_bytes() == b"the user's own file"
