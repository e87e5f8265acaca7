"""``cobot-med compare`` on a real MLflow SQLite store holding runs logged under the contract's names
(docs/CONTRACTS.md): finished runs over two datasets, methods and seeds, plus a failed run, an
unfinished one, one finished without evaluation, a superseded rerun and a run from another tool."""

from __future__ import annotations

import csv
import json
import re
import statistics
import time

import pytest

from cobot_med import cli
from cobot_med.errors import SettingsError
from cobot_med.compare import (
    format_params_k,
    load_runs,
    paper_results,
    summarize,
    write_report,
)

ENCODER_PARAMS = {"lora": 147_456, "lora+cobot": 148_320, "adaptformer": 322_752}
ORGANS = {"adome": ("liver", "kidney", "spleen", "pancreas"), "spleen": ("spleen",)}


def log_contract_run(client, dataset, peft, seed, dsc=None, organs=None, status="FINISHED", tag="finished",
                     experiment=None, arch="tiny", image_size=64, params=None, end_time=None, name=None,
                     protocols=None):
    """One training run as the bundles log it: the contract's params, metrics and status tag; ``protocols``:
    {metric name under a protocol (``test_dsc/key_slice``): value}."""
    from mlflow.entities import Metric, Param, RunTag

    experiment = experiment or f"cobot-med/{dataset}"
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, run_name=name or f"{peft}-seed{seed}")
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    values = {"dataset": dataset, "peft": peft, "arch": arch, "image_size": image_size, "seed": seed, "epochs": 1,
              "peft_options": "{}", "image_encoder_trainable": ENCODER_PARAMS.get(peft, 0),
              "mask_decoder_trainable": 4_058_340, "total_trainable": ENCODER_PARAMS.get(peft, 0) + 4_058_340}
    values.update(params or {})
    metrics = [Metric("train_loss", 0.9, now, 0), Metric("val_dsc", 0.5, now, 0)]
    if dsc is not None:
        metrics.append(Metric("test_dsc", dsc, now, 0))
        metrics.append(Metric("test_slice_dsc", dsc + 0.01, now, 0))
    for organ, value in (organs or {}).items():
        metrics.append(Metric(f"test_dsc_{organ}", value, now, 0))
    for key, value in (protocols or {}).items():
        metrics.append(Metric(key, value, now, 0))
    client.log_batch(run_id, metrics=metrics,
                     params=[Param(k, str(v)) for k, v in values.items() if v is not None],
                     tags=[RunTag("cobot_med.status", tag)] if tag else [])
    if status != "RUNNING":
        client.set_terminated(run_id, status=status, end_time=end_time or now)
    return run_id


def _organ_values(dataset, base):
    return {organ: round(base - 0.05 * i, 4) for i, organ in enumerate(ORGANS[dataset])}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A real SQLite tracking store; returns (uri, the finished runs' logged values, notable run ids)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    logged = {}  # (dataset, peft) -> list of (test_dsc, organ dict)
    ids = {}
    early = int(time.time() * 1000) - 60_000
    # a rerun of adome/lora seed 0 that finished earlier: superseded by the one below
    ids["superseded"] = log_contract_run(client, "adome", "lora", 0, dsc=0.10, organs=_organ_values("adome", 0.1),
                                         end_time=early)
    table = {
        ("adome", "lora"): (0.801, 0.823),
        ("adome", "lora+cobot"): (0.812, 0.840),
        ("spleen", "lora"): (0.901, 0.884),
        ("spleen", "lora+cobot"): (0.915, 0.932),
    }
    realistic = {}  # (dataset, peft) -> list of the protocol metrics logged
    for (dataset, peft), dscs in table.items():
        for seed, dsc in enumerate(dscs):
            organs = _organ_values(dataset, dsc + 0.05)
            protocols = {"test_dsc/box3d:10": round(dsc - 0.1, 4), "test_dsc/key_slice": round(dsc - 0.2, 4),
                         "test_dsc_liver/key_slice": round(dsc - 0.25, 4)}
            if (dataset, peft, seed) == ("adome", "lora+cobot", 1):
                protocols = {"test_dsc/box3d:10": round(dsc - 0.1, 4)}  # scored no key_slice
            ids[dataset, peft, seed] = log_contract_run(client, dataset, peft, seed, dsc=dsc, organs=organs,
                                                        protocols=protocols)
            logged.setdefault((dataset, peft), []).append((dsc, organs))
            realistic.setdefault((dataset, peft), []).append(protocols)
    ids["protocols"] = realistic
    ids["failed"] = log_contract_run(client, "adome", "adaptformer", 0, dsc=None, status="FAILED", tag=None,
                                     name="adaptformer-crashed")
    ids["unfinished"] = log_contract_run(client, "adome", "lora+cobot", 2, dsc=None, status="RUNNING", tag=None)
    ids["not_evaluated"] = log_contract_run(client, "spleen", "lora", 2, dsc=None, tag=None)
    # not a method run (no peft param): ignored
    other = client.create_experiment("scratch")
    client.set_terminated(client.create_run(other).info.run_id)
    # a run from another tool: its own experiment, only the names the comparison needs
    tool = client.create_experiment("my-tool")
    run_id = client.create_run(tool).info.run_id
    client.log_param(run_id, "dataset", "spleen")
    client.log_param(run_id, "peft", "adaptformer")
    client.log_param(run_id, "arch", "tiny")
    client.log_param(run_id, "image_size", "64")
    client.log_metric(run_id, "test_dsc", 0.877)
    client.set_terminated(run_id)
    ids["other_tool"] = run_id
    return uri, logged, ids


def _mean_std_text(values):
    values = [100.0 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def _markdown_table(text, title):
    """The rows of the Markdown table under ``## title`` as dicts keyed by the header."""
    block = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in block.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_load_runs_states(store):
    uri, _, ids = store
    runs = load_runs(uri).set_index("run_id")
    assert len(runs) == 8 + 1 + 3 + 1  # finished + superseded + failed/unfinished/not evaluated + other tool
    assert runs.loc[ids["failed"], "state"] == "failed"
    assert runs.loc[ids["unfinished"], "state"] == "unfinished"
    assert runs.loc[ids["not_evaluated"], "state"] == "not evaluated"
    assert runs.loc[ids["other_tool"], "state"] == "finished"
    assert runs.loc[ids["superseded"], "state"] == "finished"  # superseding is summarize's business
    assert {"test_dsc_liver", "test_dsc_pancreas", "test_dsc_spleen"} <= set(runs.columns)
    assert runs.loc[ids["superseded"], "image_encoder_trainable"] == 147_456
    assert runs.loc[ids["superseded"], "seed"] == 0


def test_experiment_selection(store):
    uri, _, _ = store
    assert set(load_runs(uri, ["cobot-med/spleen"])["dataset"]) == {"spleen"}
    assert set(load_runs(uri, "cobot-med/*")["experiment"]) == {"cobot-med/adome", "cobot-med/spleen"}
    assert set(load_runs(uri, "my-tool,cobot-med/adome")["experiment"]) == {"my-tool", "cobot-med/adome"}
    with pytest.raises(SettingsError, match="no experiment named cobot-med/nope"):
        load_runs(uri, ["cobot-med/nope"])
    with pytest.raises(SettingsError, match=r"no MLflow tracking store at .*\.missing \(file .* does not exist\)"):
        load_runs(f"sqlite:///{uri[len('sqlite:///'):]}.missing")


def test_compare_cli_table_matches_logged_metrics(store, tmp_path, capsys):
    uri, logged, ids = store
    out = tmp_path / "report"
    assert cli.main(["compare", "--tracking-uri", uri, "--experiment", "cobot-med/*", "--out", str(out)]) == 0
    text = capsys.readouterr().out

    rows = {row["method"]: row for row in _markdown_table(text, "Test DSC (%) per method")}
    assert list(rows) == ["lora", "lora+cobot"]  # the paper's order; adaptformer only failed here
    paper = paper_results()["methods"]
    for peft, row in rows.items():
        assert row["arch"] == "tiny@64"
        assert row["params (K)"] == format_params_k(ENCODER_PARAMS[peft] / 1000)
        assert row["paper (K)"] == f"{paper[peft]['params_k']:.1f}"
        means = []
        for dataset in ("adome", "spleen"):
            values = [dsc for dsc, _ in logged[(dataset, peft)]]
            column = next(c for c in row if c.startswith(dataset))
            assert row[column] == _mean_std_text(values), (peft, dataset)
            paper_mean, paper_std = paper[peft]["dsc"][dataset]
            assert row[f"{dataset} paper"] == f"{paper_mean:.1f} ± {paper_std:.1f}"
            means.append(statistics.mean(values) * 100)
        assert row["avg"] == f"{statistics.mean(means):.1f}"
        assert row["seeds"] == "2"
    assert rows["lora"]["params (K)"] == "147.4"  # truncated as the paper prints it

    organ_rows = {row["method"]: row for row in _markdown_table(text, "adome (ADOME): test DSC (%) per organ")}
    for peft in ("lora", "lora+cobot"):
        for organ in ORGANS["adome"]:
            expected = _mean_std_text([organs[organ] for _, organs in logged[("adome", peft)]])
            assert organ_rows[peft][organ] == expected

    left_out = text.split("## Runs left out", 1)[1]
    assert re.search(rf"adaptformer-crashed \({ids['failed']}\) adome/adaptformer seed 0: run failed", left_out)
    assert f"({ids['unfinished']}) adome/lora+cobot seed 2: run not closed (still running, or its process died)" in left_out
    assert f"({ids['not_evaluated']}) spleen/lora seed 2: no test_dsc metric" in left_out
    assert f"({ids['superseded']}) adome/lora seed 0: superseded by the later run" in left_out

    for name in ("dsc_vs_params.png", "organ_dsc.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    assert (out / "compare.md").read_text() in text
    with open(out / "methods.csv", newline="") as f:
        methods = {row["method"]: row for row in csv.DictReader(f)}
    values = [100 * dsc for dsc, _ in logged[("spleen", "lora+cobot")]]
    assert float(methods["lora+cobot"]["spleen_mean"]) == pytest.approx(statistics.mean(values))
    assert float(methods["lora+cobot"]["spleen_std"]) == pytest.approx(statistics.stdev(values))
    assert int(float(methods["lora+cobot"]["spleen_n"])) == 2
    with open(out / "runs.csv", newline="") as f:
        states = {row["run_id"]: row["state"] for row in csv.DictReader(f)}
    assert states[ids["failed"]] == "failed" and states[ids["superseded"]] == "superseded"


def test_compare_selects_the_protocol_and_shows_the_papers_beside_the_realistic_ones(store, tmp_path, capsys):
    uri, logged, ids = store
    realistic = ids["protocols"]
    out = tmp_path / "report"
    assert cli.main(["compare", "--tracking_uri", uri, "--experiment", "cobot-med/*", "--out", str(out),
                     "--prompts", "key_slice"]) == 0
    text = capsys.readouterr().out
    assert "## Test DSC (%) per method: mean ± std over seeds, prompts key_slice" in text
    rows = {row["method"]: row for row in _markdown_table(text, "Test DSC (%) per method")}
    assert "paper (K)" not in rows["lora"] and "adome paper" not in rows["lora"]  # the paper's are tight boxes
    for peft in ("lora", "lora+cobot"):
        for dataset in ("adome", "spleen"):
            values = [p["test_dsc/key_slice"] for p in realistic[dataset, peft] if "test_dsc/key_slice" in p]
            column = next(c for c in rows[peft] if c.startswith(dataset))
            assert rows[peft][column] == _mean_std_text(values), (peft, dataset)
    organ_rows = {row["method"]: row for row in _markdown_table(text, "adome (ADOME): test DSC (%) per organ")}
    liver = [p["test_dsc_liver/key_slice"] for p in realistic["adome", "lora"]]
    assert organ_rows["lora"]["liver"] == _mean_std_text(liver)
    assert list(organ_rows["lora"]) == ["method", "liver"]  # the organs scored under key_slice (test_dsc_<organ> are tight's)
    assert (f"({ids['adome', 'lora+cobot', 1]}) adome/lora+cobot seed 1: no test_dsc/key_slice metric"
            in text.split("## Runs left out", 1)[1])

    # the default: tight (the papers') in the main table, and every protocol beside it per method
    summary = summarize(load_runs(uri, "cobot-med/*"))
    assert summary.prompts == "tight" and summary.methods["adome_paper_mean"].notna().all()
    text = write_report(summary, out)["markdown"].read_text()
    table = {row["method"]: row for row in _markdown_table(text, "adome (ADOME): test DSC (%) by prompt protocol")}
    assert list(table["lora+cobot"]) == ["method", "tight (oracle)", "box3d:10", "key_slice", "paper (tight)"]
    paper_mean, paper_std = paper_results()["methods"]["lora+cobot"]["dsc"]["adome"]
    assert table["lora+cobot"]["tight (oracle)"] == _mean_std_text([d for d, _ in logged["adome", "lora+cobot"]])
    assert table["lora+cobot"]["box3d:10"] == _mean_std_text(
        [p["test_dsc/box3d:10"] for p in realistic["adome", "lora+cobot"]])
    assert table["lora+cobot"]["key_slice"] == _mean_std_text([realistic["adome", "lora+cobot"][0]["test_dsc/key_slice"]])
    assert table["lora+cobot"]["paper (tight)"] == f"{paper_mean:.1f} ± {paper_std:.1f}"
    with open(out / "protocols.csv", newline="") as f:
        assert {(r["dataset"], r["protocol"]) for r in csv.DictReader(f)} == {
            (d, p) for d in ("adome", "spleen") for p in ("tight", "box3d:10", "key_slice")}
    assert (out / "protocol_dsc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert cli.main(["compare", "--tracking_uri", uri, "--out", str(tmp_path / "o"), "--prompts", "keyslice"]) == 2
    assert "--prompts: unknown protocol 'keyslice'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_other_tools_runs_join(store, tmp_path):
    uri, _, ids = store
    summary = summarize(load_runs(uri))  # every experiment, "my-tool" included
    row = summary.methods.set_index("method").loc["adaptformer"]
    assert row["spleen_mean"] == pytest.approx(87.7)
    assert row["spleen_n"] == 1 and row["adome_n"] == 0
    assert row["paper_params_k"] == pytest.approx(322.7)
    assert ids["other_tool"] in set(summary.runs["run_id"])
    paths = write_report(summary, tmp_path)
    assert "| adaptformer | tiny@64 | — | 322.7 | — | 90.1 ± 0.2 | 87.7 | 94.8 ± 0.5 | — | 92.4 | 1 |" in \
        paths["markdown"].read_text()


def test_without_paper_and_mixed_options(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    log_contract_run(client, "segrap", "lora", 0, dsc=0.5, params={"peft_options": '{"rank": 8}'})
    log_contract_run(client, "segrap", "lora", 0, dsc=0.6, params={"peft_options": '{ "rank":4 }'})
    summary = summarize(load_runs(uri), paper={})
    assert list(summary.methods["method"]) == ['lora {"rank":4}', 'lora {"rank":8}']
    assert list(summary.methods["segrap_mean"]) == pytest.approx([60.0, 50.0])
    assert summary.left_out.empty


def test_compare_cli_errors(tmp_path, capsys):
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    assert cli.main(["compare", "--tracking-uri", missing, "--out", str(tmp_path / "o")]) == 2
    assert "no MLflow tracking store" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'failed.db'}"
    log_contract_run(MlflowClient(tracking_uri=uri), "adome", "lora", 0, status="FAILED", tag=None)
    assert cli.main(["compare", "--tracking-uri", uri, "--out", str(tmp_path / "o")]) == 1
    captured = capsys.readouterr()
    assert "no finished run" in captured.err and "adome/lora seed 0: run failed" in captured.out
    assert (tmp_path / "o" / "dsc_vs_params.png").is_file()


def test_paper_results_resource():
    paper = paper_results()
    assert "CVPR 2024" in paper["source"] and "Table 4" in paper["source"]
    methods = paper["methods"]
    assert list(methods) == ["frozen", "decoder", "lora", "lora+cobot", "adaptformer", "adaptformer+cobot"]
    assert [methods[m]["params_k"] for m in methods] == [0, 0, 147.4, 148.3, 322.7, 324.0]
    # Table 4 means (METHODS.md) and the paper's std
    assert methods["lora+cobot"]["dsc"] == {"adome": [88.7, 0.2], "spleen": [94.9, 0.1], "segrap": [70.1, 0.1]}
    assert methods["frozen"]["dsc"]["spleen"] == [24.3, 11.5]
    assert methods["adaptformer+cobot"]["dsc"]["segrap"] == [73.1, 0.1]
    assert json.dumps(paper)  # plain JSON


def test_format_params_k():
    assert [format_params_k(n / 1000) for n in (0, 147_456, 148_320, 322_752, 324_048)] == [
        "0.0", "147.4", "148.3", "322.7", "324.0"]
