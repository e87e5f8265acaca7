"""Volume and slice transforms on phantoms of all three layouts: orientation, windowing, inversion,
sample format, box prompts and jitter, the area threshold, label maps written back into the files' grids."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose, EnsureChannelFirstd, Orientationd

from cobot_med.data.datalist import build_datalist
from cobot_med.data.dataset import SliceDataset, VolumeDataset
from cobot_med.data.layouts import get_layout
from cobot_med.data.chains import slice_chain
from cobot_med.data.chains import volume_chain as volume_transforms
from cobot_med.data.slices import BoxPromptsd, SliceOrganMasksd, organ_area_threshold
from cobot_med.data.volume import LoadVolumed, intensity_transform
from cobot_med.predict import from_labels
from cobot_med.predict.writing import write_label_map

pytestmark = pytest.mark.usefixtures("single_torch_thread")

LAYOUT_NAMES = ("adome", "spleen", "segrap")
S = 64  # model input size in these tests


@pytest.fixture(scope="module")
def volumes(phantom_dirs):
    """The five phantom cases of each layout through the layout's volume chain (cached)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    for layout in LAYOUT_NAMES:
        spec = get_layout(layout)
        cases = sum(build_datalist(layout, phantom_dirs[layout], 0.0, 0.0).values(), [])
        out[layout] = VolumeDataset(cases, volume_transforms(spec.organ_ids, spec.ct_window, layout=layout))
        assert not out[layout].failures and len(out[layout]) == 5
    torch.set_num_threads(threads)
    return out


def centroid(label, organ_id):
    return np.argwhere(np.asarray(label[0]) == organ_id).mean(axis=0)  # (x, y, z) voxel indices


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_every_storage_order_becomes_ras_with_the_last_axis_superior(volumes, layout):
    spec = get_layout(layout)
    for volume in volumes[layout]:
        image, label = volume["image"], volume["label"]
        assert nib.aff2axcodes(np.asarray(image.affine)) == ("R", "A", "S")
        assert image.dtype == torch.float32 and label.dtype == torch.uint8 and image.shape == label.shape
        assert 0 <= image.min() and image.max() <= 255 and image.max() > 150  # windowed to [0, 255]
        assert set(torch.unique(label).tolist()) == {0, *spec.organ_ids}  # other classes became background
        if layout == "adome":  # liver above the kidneys, spleen on the patient's left (low x in RAS)
            assert centroid(label, 1)[2] > centroid(label, 2)[2] and centroid(label, 3)[0] < centroid(label, 1)[0]
        if layout == "segrap":  # brainstem above the spinal cord, left parotid at low x
            organs = spec.organs
            assert centroid(label, organs["BrainStem"])[2] > centroid(label, organs["SpinalCord"])[2] + 5
            assert centroid(label, organs["Parotid_L"])[0] < centroid(label, organs["Parotid_R"])[0]


@pytest.mark.slow  # ~2.5 s; the fast tier's time budget
@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore:builtin type Swig:DeprecationWarning")  # importing itk
def test_nibabel_and_itk_readers_give_the_same_oriented_volume(phantom_dirs):
    cases = build_datalist("adome", phantom_dirs["adome"], 0.0, 0.0)["training"][:4]  # RAS, LPS, SRA, oblique

    def load(reader):
        keys = ["image", "label"]
        chain = Compose([LoadVolumed(keys=keys, reader=reader), EnsureChannelFirstd(keys=keys),
                         Orientationd(keys=keys, axcodes="RAS", labels=None)])
        return [chain(dict(case)) for case in cases]

    for a, b in zip(load("NibabelReader"), load("ITKReader")):
        for key in ("image", "label"):
            assert torch.equal(a[key].as_tensor().float(), b[key].as_tensor().float())
            assert np.allclose(np.asarray(a[key].affine), np.asarray(b[key].affine), atol=1e-5)


def test_ct_windows_map_hu_to_0_255():
    hu = torch.tensor([[-1000.0, -500.0, 250.0, 1000.0, 3000.0]])
    assert intensity_transform("CT", (-500, 1000))({"image": hu})["image"].tolist() == [[0, 0, 127.5, 255, 255]]
    soft = intensity_transform("CT", get_layout("segrap").ct_window)({"image": torch.tensor([[-160.0, 40.0, 240.0]])})
    assert soft["image"].tolist() == [[0, 127.5, 255]]
    with pytest.raises(ValueError, match="CT window"):
        intensity_transform("CT", (100, -100))
    with pytest.raises(ValueError, match="modality must be CT or MR"):
        intensity_transform("PET")


def test_mr_intensities_are_scaled_by_percentiles():
    values = torch.arange(1000.0)[None]  # 0..999
    values[0, -1] = 1e6  # one outlier
    out = intensity_transform("MR")({"image": values})["image"]
    assert out.min() == 0 and out.max() == 255
    assert (out == 255).sum() >= 5 and (out == 0).sum() >= 5  # 0.5 % clipped at each end
    assert torch.all(out[0, 1:] >= out[0, :-1])  # monotonic


@pytest.mark.parametrize("layout", ["adome", "segrap"])
def test_label_maps_go_back_to_the_files_geometry_exactly(volumes, phantom_dirs, layout, tmp_path):
    """reorient -> label map in the oriented grid -> write_label_map (Invertd + the file's affine) gives back each
    label file voxel for voxel, in its storage order."""
    spec = get_layout(layout)
    chain = volumes[layout].volume_transform
    cases = sum(build_datalist(layout, phantom_dirs[layout], 0.0, 0.0).values(), [])
    for case, volume in zip(cases, volumes[layout]):
        path = write_label_map(volume["label"].as_tensor(), volume["image"], chain, tmp_path / f"{case['case_id']}.nii.gz")
        written = nib.load(str(path))
        if isinstance(case["label"], list):
            stored = np.zeros(nib.load(case["label"][0]).shape)
            for path, organ_id in zip(case["label"], spec.organ_ids):
                stored[np.asarray(nib.load(path).dataobj) > 0] = organ_id
        else:
            stored = np.asarray(nib.load(case["label"]).dataobj)
            stored = np.where(np.isin(stored, spec.organ_ids), stored, 0)
        assert written.shape == stored.shape  # the storage order, e.g. S-I first
        assert np.array_equal(np.asarray(written.dataobj), stored)
        assert np.allclose(written.affine, nib.load(case["image"]).affine, atol=1e-4)


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_samples_have_the_contract_shapes_and_types(volumes, layout):
    spec = get_layout(layout)
    K = len(spec.organs)
    dataset = SliceDataset(volumes[layout], slice_chain(spec.organ_ids, S), spec.organ_ids, seed=0)
    assert len(dataset) > 20
    for i in (0, len(dataset) // 2, len(dataset) - 1):
        sample = dataset[i]
        assert set(sample) == {"image", "masks", "boxes", "valid", "organ_ids", "case_id", "slice_index"}
        assert type(sample["image"]) is torch.Tensor  # plain tensors, not MetaTensor
        assert sample["image"].shape == (3, S, S) and sample["image"].dtype == torch.float32
        assert 0 <= sample["image"].min() and sample["image"].max() <= 255
        assert torch.equal(sample["image"][0], sample["image"][2])  # one slice, three channels
        assert sample["masks"].shape == (K, S, S) and sample["masks"].dtype == torch.float32
        assert set(torch.unique(sample["masks"]).tolist()) <= {0.0, 1.0}
        assert sample["boxes"].shape == (K, 4) and sample["boxes"].dtype == torch.float32
        assert sample["valid"].shape == (K,) and sample["valid"].dtype == torch.bool and sample["valid"].any()
        assert sample["organ_ids"].dtype == torch.int64 and sample["organ_ids"].tolist() == spec.organ_ids
        assert isinstance(sample["case_id"], str) and isinstance(sample["slice_index"], int)
        assert torch.all(sample["boxes"][~sample["valid"]] == 0)
    batch = torch.utils.data.default_collate([dataset[0], dataset[1], dataset[2]])
    assert batch["image"].shape == (3, 3, S, S) and batch["masks"].shape == (3, K, S, S)
    assert batch["boxes"].shape == (3, K, 4) and batch["valid"].shape == (3, K)


def slice_with_organs(height=60, width=80):
    label = torch.zeros(1, height, width)
    label[0, 10:30, 20:50] = 1  # large organ
    label[0, 40:58, 2:9] = 2  # near the border: jitter must clip
    label[0, 2:4, 70:72] = 3  # 4 px: below the area threshold (100 px at 256^2 -> 7.3 px here)
    return {"image": torch.rand(1, height, width) * 255, "label": label}


def tight(mask):
    rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
    return [cols.min().item(), rows.min().item(), cols.max().item() + 1, rows.max().item() + 1]


def test_boxes_contain_their_masks_and_jitter_stays_within_0_50_px_per_side():
    masks_t, boxes_t = SliceOrganMasksd([1, 2, 3], min_area=100), BoxPromptsd(jitter=50)
    boxes_t.set_random_state(0)
    data = masks_t(slice_with_organs())
    assert data["valid"].tolist() == [True, True, False]
    sides = []
    for _ in range(300):
        out = boxes_t(data)
        for k in range(2):
            x0, y0, x1, y1 = out["boxes"][k].tolist()  # in the slice grid
            tx0, ty0, tx1, ty1 = tight(data["masks"][k].bool())
            assert x0 <= tx0 and y0 <= ty0 and x1 >= tx1 and y1 >= ty1  # contains the mask
            assert 0 <= x0 and 0 <= y0 and x1 <= 80 and y1 <= 60  # clipped to the slice
            widening = [tx0 - x0, ty0 - y0, x1 - tx1, y1 - ty1]
            assert all(0 <= w <= 50 for w in widening)
            if k == 0:  # far enough from the borders on the right and bottom: unclipped draws
                sides.append(widening)
            assert torch.equal(out["boxes"][k], out["boxes"][k].round())  # whole pixels
        assert out["boxes"][2].abs().sum() == 0  # no box for the organ below the threshold
    sides = np.array(sides)
    assert sides[:, 2].min() == 0 and sides[:, 2].max() == 30  # x1 may reach 80 at most: clipped at 30
    assert sides[:, 3].max() == 30 and len(np.unique(sides[:, 3])) > 25  # uniform over 0..30 (clipped above)
    assert abs(np.corrcoef(sides[:, 2], sides[:, 3])[0, 1]) < 0.2  # independent sides


def test_switching_jitter_off_gives_the_tight_box():
    data = SliceOrganMasksd([1, 2, 3])(slice_with_organs())
    out = BoxPromptsd(jitter=0)(data)
    assert out["boxes"][0].tolist() == tight(data["masks"][0].bool()) == [20, 10, 50, 30]
    from cobot_med.data.slices import ModelInputd
    from cobot_med.sam.recipes import SamRecipe

    model = ModelInputd(SamRecipe(80))(out)  # then the recipe maps them to the model grid
    assert model["boxes"][0].tolist() == pytest.approx([20, 10 * 80 / 60, 50, 30 * 80 / 60])
    assert model["image"].shape == (3, 80, 80) and model["masks"].shape == (3, 80, 80)
    with pytest.raises(ValueError, match="jitter must be >= 0"):
        BoxPromptsd(jitter=-1)


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_phantom_samples_boxes_hold_their_masks_in_the_model_grid(volumes, layout):
    spec = get_layout(layout)
    train = SliceDataset(volumes[layout], slice_chain(spec.organ_ids, S, jitter=50), spec.organ_ids, seed=1)
    tight_set = SliceDataset(volumes[layout], slice_chain(spec.organ_ids, S, jitter=0), spec.organ_ids, seed=1)
    widened = 0
    for i in range(0, len(train), 3):
        sample, reference = train[i], tight_set[i]
        assert torch.equal(sample["masks"], reference["masks"]) and torch.equal(sample["image"], reference["image"])
        for k in sample["valid"].nonzero()[:, 0].tolist():
            x0, y0, x1, y1 = sample["boxes"][k].tolist()
            assert 0 <= x0 < x1 <= S and 0 <= y0 < y1 <= S
            rows, cols = sample["masks"][k].nonzero(as_tuple=True)
            # every mask pixel's centre lies inside the box (nearest-exact resize)
            assert x0 <= cols.min() + 0.5 and cols.max() + 0.5 <= x1
            assert y0 <= rows.min() + 0.5 and rows.max() + 0.5 <= y1
            tx0, ty0, tx1, ty1 = reference["boxes"][k].tolist()
            assert x0 <= tx0 and y0 <= ty0 and x1 >= tx1 and y1 >= ty1  # jitter only widens
            widened += (x1 - x0) * (y1 - y0) > (tx1 - tx0) * (ty1 - ty0)
    assert widened > 10


def test_jitter_is_seeded(volumes):
    spec = get_layout("adome")

    def boxes(seed):
        dataset = SliceDataset(volumes["adome"], slice_chain(spec.organ_ids, S), spec.organ_ids, seed=seed)
        return torch.stack([dataset[i]["boxes"] for i in range(10)])

    assert torch.equal(boxes(4), boxes(4)) and not torch.equal(boxes(4), boxes(5))


def write_volume(folder, label, name="c"):
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    nib.save(nib.Nifti1Image(np.full(label.shape, 40, np.int16), affine), folder / f"{name}_img.nii.gz")
    nib.save(nib.Nifti1Image(label.astype(np.uint8), affine), folder / f"{name}_lab.nii.gz")
    return {"image": str(folder / f"{name}_img.nii.gz"), "label": str(folder / f"{name}_lab.nii.gz"), "case_id": name}


def test_slices_below_the_area_threshold_are_skipped(tmp_path):
    assert organ_area_threshold(100, 256, 256) == 100 and organ_area_threshold(100, 64, 64) == 6.25
    assert organ_area_threshold(100, 512, 512) == 400  # the same fraction of the slice
    label = np.zeros((64, 64, 7), np.uint8)
    label[10:40, 10:40, 1:3] = 1  # 900 px: kept
    label[10:13, 10:13, 4] = 1  # 9 px > 6.25: kept
    label[10:12, 10:12, 5] = 1  # 4 px: skipped
    label[10:12, 10:12, 6] = 1  # organ 1 too small...
    label[30:40, 30:40, 6] = 2  # ...but organ 2 passes: the slice enters, organ 1 not valid
    volumes = VolumeDataset([write_volume(tmp_path, label)], volume_transforms([1, 2]))
    dataset = SliceDataset(volumes, slice_chain([1, 2], 32), [1, 2], min_area=100)
    assert sorted(z for _, z in dataset.index) == [1, 2, 4, 6]
    sample = next(dataset[i] for i in range(len(dataset)) if dataset[i]["slice_index"] == 6)
    assert sample["valid"].tolist() == [False, True] and sample["boxes"][0].abs().sum() == 0
    bigger = SliceDataset(volumes, slice_chain([1, 2], 32, min_area=1000), [1, 2], min_area=1000)
    assert sorted(z for _, z in bigger.index) == [1, 2, 6]  # 62.5 px at 64 x 64
    _, present = from_labels(volumes[0]["label"], {"a": 1, "b": 2}).fixed()  # evaluation: any pixel counts
    assert present.any(dim=1).nonzero(as_tuple=True)[0].tolist() == [1, 2, 4, 5, 6]
