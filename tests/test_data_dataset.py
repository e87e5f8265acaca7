"""Cached volumes and the slice dataset: a volume is read once however many slices are drawn; the loader benchmark."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from monai.data import DataLoader, NibabelReader

from cobot_med.data.datalist import build_datalist, write_datalist
from cobot_med.data.dataset import SliceDataset, VolumeDataset, resolve_datalist
from cobot_med.data.layouts import get_layout
from cobot_med.data.chains import slice_chain
from cobot_med.data.chains import volume_chain as volume_transforms
from cobot_med.data.validation import DataError

pytestmark = pytest.mark.usefixtures("single_torch_thread")

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture
def reads(monkeypatch):
    """Every file MONAI's NIfTI reader opens, in order."""
    opened: list[str] = []
    original = NibabelReader.read

    def counting(self, data, **kwargs):
        opened.extend(str(p) for p in (data if isinstance(data, (list, tuple)) else [data]))
        return original(self, data, **kwargs)

    monkeypatch.setattr(NibabelReader, "read", counting)
    return opened


@pytest.mark.parametrize("layout", ["spleen", "segrap"])
def test_a_volume_is_read_once_however_many_slices_are_drawn(phantom_dirs, reads, layout):
    spec = get_layout(layout)
    cases = build_datalist(layout, phantom_dirs[layout], 0.0, 0.0)["training"]
    files = [p for c in cases for p in ([c["image"]] + (c["label"] if isinstance(c["label"], list) else [c["label"]]))]
    volumes = VolumeDataset(cases, volume_transforms(spec.organ_ids, spec.ct_window, layout=layout))
    assert sorted(reads) == sorted(files)  # each image and label file once (per-organ files once each)
    dataset = SliceDataset(volumes, slice_chain(spec.organ_ids, 32), spec.organ_ids)
    for i in range(len(dataset)):  # an epoch by index, then one through a shuffling DataLoader
        dataset[i]
    drawn = sum(batch["image"].shape[0] for batch in DataLoader(dataset, batch_size=4, shuffle=True))
    assert len(dataset) > 40 and drawn == len(dataset)
    assert sorted(reads) == sorted(files)  # nothing re-read
    assert {(s["case_id"], s["slice_index"]) for s in (dataset[i] for i in range(len(dataset)))} == {
        (volumes[v]["case_id"], z) for v, z in dataset.index}


def test_slices_index_cases_in_order_and_only_slices_with_organs(phantom_dirs):
    spec = get_layout("adome")
    cases = build_datalist("adome", phantom_dirs["adome"], 0.0, 0.0)["training"]
    volumes = VolumeDataset(cases, volume_transforms(spec.organ_ids, spec.ct_window, layout="adome"))
    dataset = SliceDataset(volumes, slice_chain(spec.organ_ids, 32), spec.organ_ids)
    for v, volume in enumerate(volumes):
        zs = [z for w, z in dataset.index if w == v]
        depth = volume["image"].shape[-1]
        assert zs == sorted(zs) and 0 < len(zs) < depth  # the empty top and bottom slices are left out
        assert all(volume["label"][..., z].any() for z in zs)


def test_resolve_datalist_takes_a_file_instead_of_the_folder(phantom_dirs, tmp_path):
    from cobot_med.errors import SettingsError
    from cobot_med.settings import load_settings

    def settings(**values):
        return load_settings("spleen", output_dir=str(tmp_path / "out"), seed=1, **values)

    split = resolve_datalist(settings(dataset_dir=str(phantom_dirs["spleen"])))
    assert not (tmp_path / "out").exists()  # nothing written: the training session records the split it runs
    written = write_datalist(split, tmp_path / "out" / "datalist.json", layout="spleen")
    assert json.loads(written.read_text())["layout"] == "spleen"
    assert resolve_datalist(settings(dataset_dir="/nowhere", datalist=str(written))) == split
    only_two = write_datalist({"training": split["training"][:2]}, tmp_path / "two.json")
    assert [len(v) for v in resolve_datalist(settings(datalist=str(only_two))).values()] == [2, 0, 0]
    no_training = write_datalist({"validation": split["training"][:2]}, tmp_path / "val.json")
    with pytest.raises(SettingsError, match="no training cases"):
        resolve_datalist(settings(datalist=str(no_training)))


def test_training_slices_need_labels(tmp_path, phantom_dirs):
    case = build_datalist("spleen", phantom_dirs["spleen"], 0.0, 0.0)["training"][0]
    volumes = VolumeDataset([{"image": case["image"], "case_id": "unlabelled"}], volume_transforms([1]))
    with pytest.raises(DataError, match="case unlabelled: no label"):
        SliceDataset(volumes, slice_chain([1], 32), [1])


def test_the_loader_benchmark_prints_its_figure(capsys):
    spec = importlib.util.spec_from_file_location("loader_benchmark", REPOSITORY / "benchmarks" / "loader.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    result = module.main(["--layout", "segrap", "--cases", "2", "--shape", "48", "48", "16", "--image-size", "64",
                          "--epochs", "1"])
    assert torch.get_num_threads() == threads  # restored
    printed = capsys.readouterr().out
    assert json.loads(printed.splitlines()[0]) == result
    assert result["slices"] > 10 and result["slices_per_second"] > 0
    assert "slices / second" in printed
