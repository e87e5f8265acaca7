"""What a user types and reads on the ``cobot-med`` command line: every long flag in both spellings, help in
the bundles' one, a wrong flag answered with its sub-command's usage, and the base a run gets by default."""

from __future__ import annotations

import argparse
import re

import pytest

from cobot_med.cli import COMMANDS, build_parser, main
from cobot_med.errors import SettingsError
from cobot_med.settings import load_settings, resolve_arch


def sub_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def with_nested(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser`` and its own sub-commands' parsers (``data fetch``, ``reproduce table4``), all the way down."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found += with_nested(child)
    return found


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_long_flag_takes_both_spellings_and_help_shows_one(command):
    for parser in with_nested(sub_parsers()[command]):
        check_flags_and_help(parser)


def check_flags_and_help(parser: argparse.ArgumentParser):
    flags = [s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
    for flag in flags:
        words = flag[2:]
        for spelling in ("--" + words.replace("-", "_"), "--" + words.replace("_", "-")):
            assert parser._option_string_actions[spelling] is parser._option_string_actions[flag], spelling
    assert [a.option_strings for a in parser._actions if not a.help] == []  # every option says what it does
    shown = parser.format_help()
    assert not re.findall(r"--[a-z]+-[a-z]", shown), re.findall(r"--[a-z]+-[a-z][a-z-]*", shown)


@pytest.mark.parametrize("spelling", ["--sam_checkpoint", "--sam-checkpoint"])
def test_infer_reads_either_spelling_into_the_same_setting(spelling):
    args = build_parser().parse_args(["infer", "--config", "adome", "--input", "in", "--output", "out",
                                      spelling, "sam.pth", "--batch-size", "4", "--nsd_tolerance", "3"])
    assert (args.sam_checkpoint, args.batch_size, args.nsd_tolerance) == ("sam.pth", 4, 3.0)


@pytest.mark.parametrize("spelling", ["--dataset_dir", "--dataset-dir", "--tracking_uri", "--tracking-uri"])
def test_sweep_reads_either_spelling(spelling):
    args = build_parser().parse_args(["sweep", "--config", "adome", "--peft", "lora", spelling, "somewhere"])
    assert "somewhere" in (args.dataset_dir, args.tracking_uri)


def test_a_wrong_flag_shows_the_sub_commands_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["params", "--arch", "tiny", "--peft", "lora", "--bogus", "1"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith("usage: cobot-med params") and "unrecognized arguments: --bogus 1" in err


def test_the_top_level_help_describes_the_tool():
    shown = " ".join(build_parser().format_help().split())
    assert "Segment Anything" in shown and "python -m monai.bundle run training --config_file bundles/adome.json" in shown


@pytest.mark.parametrize("arch, run_id, checkpoint, adapter_arch, expected", [
    ("auto", "training", "", None, "vit_b"),           # the papers' base, even with no weights (then refused)
    ("auto", "evaluate", "", None, "lite_medsam"),     # no weights given: the embedded base
    ("auto", "inference", "", None, "lite_medsam"),
    ("auto", "inference", "sam.pth", None, "vit_b"),   # a checkpoint: the papers' base
    ("auto", "inference", "", "tiny", "tiny"),         # an adapter: its own base
    ("medsam_vit_b", "inference", "", None, "medsam_vit_b"),
])
def test_arch_auto(arch, run_id, checkpoint, adapter_arch, expected):
    assert resolve_arch(arch, run_id, checkpoint, adapter_arch) == expected


def test_inference_without_weights_runs_the_embedded_base_and_says_so(tmp_path, capsys):
    (tmp_path / "in").mkdir(), (tmp_path / "labels").mkdir()
    settings = load_settings("adome", input_dir=str(tmp_path / "in"), labels_dir=str(tmp_path / "labels"),
                             output_dir=str(tmp_path / "out"))
    assert settings.arch == "auto"
    settings.check("inference")
    assert settings.arch == "lite_medsam"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "runs the LiteMedSAM base that ships with the install" in err


def test_training_keeps_the_papers_base_and_says_how_to_train_without_its_weights(tmp_path):
    settings = load_settings("adome", dataset_dir=str(tmp_path), output_dir=str(tmp_path / "out"))
    with pytest.raises(SettingsError, match=r"arch vit_b needs Meta's weights.*--arch lite_medsam"):
        settings.check("training")


def test_flags_that_contradict_the_adapter_are_refused_not_ignored(tmp_path):
    from cobot_med.adapter import save_adapter
    from cobot_med.model import ModelSpec, build_model

    adapter = save_adapter(build_model(ModelSpec("tiny", 64, "lora")), tmp_path / "adapter")
    (tmp_path / "in").mkdir()
    common = dict(input_dir=str(tmp_path / "in"), labels_dir=str(tmp_path / "in"), output_dir=str(tmp_path / "o"),
                  adapter=str(adapter))
    with pytest.raises(SettingsError, match="arch vit_b does not apply: the adapter .* was trained on tiny"):
        load_settings("adome", arch="vit_b", **common).check("inference")
    with pytest.raises(SettingsError, match="image_size 128 does not apply: .* trained at 64 px"):
        load_settings("adome", image_size=128, **common).check("inference")
    settings = load_settings("adome", **common).check("inference")
    assert (settings.arch, settings.image_size) == ("tiny", 64)  # what runs is what is recorded


def test_training_the_frozen_base_is_refused_with_what_to_run_instead(tmp_path):
    """``peft frozen`` has nothing to train (the optimiser crashed on the first step): one named line."""
    settings = load_settings("adome", dataset_dir=str(tmp_path), output_dir=str(tmp_path / "out"), arch="tiny",
                             peft="frozen")
    with pytest.raises(SettingsError, match="peft frozen trains nothing .* run evaluate --config_file bundles/adome.json"):
        settings.check("training")
