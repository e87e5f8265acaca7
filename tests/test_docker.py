"""docker/: the image and the compose file checked without a Docker engine, and the shared tracking
set-up run for real: the project's MLflow logging and ``cobot-med compare`` against a PostgreSQL
server (CI starts one from Debian's packages with .ci/postgres.sh and exports its URI)."""

from __future__ import annotations

import os
import re
import tomllib
import shlex
import statistics
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import yaml

from cobot_med import cli

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.yaml"
DOCKERIGNORE = ROOT / ".dockerignore"


# --------------------------------------------------------------------------------------------------
# Dockerfile and .dockerignore, read as Docker reads them


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuation lines joined."""
    instructions, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):  # comment lines inside a continued instruction
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, rest = current.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    return instructions


def copy_sources(arguments: str) -> list[str]:
    """The context paths of a COPY/ADD (flags dropped; none for --from, which copies from a stage)."""
    parts = shlex.split(arguments)
    flags = [p for p in parts if p.startswith("--")]
    paths = [p for p in parts if not p.startswith("--")]
    if any(f.startswith("--from") for f in flags):
        return []
    return paths[:-1]


class DockerIgnore:
    """.dockerignore as Docker applies it: patterns relative to the context root, ``*`` and ``?``
    within a path segment, ``**`` across segments, ``!`` re-includes, the last matching line wins,
    and a path is out when it or one of its parent folders is matched."""

    def __init__(self, text: str):
        self.rules = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = line[1:] if negate else line
            pattern = os.path.normpath(pattern.strip("/")) if pattern.strip("/") else "."
            self.rules.append((re.compile(self._regex(pattern)), negate))

    @staticmethod
    def _regex(pattern: str) -> str:
        out, i = "^", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out, i = out + pattern[i:end + 1], end + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return out + "$"

    def excluded(self, path: str) -> bool:
        parts = Path(path).parts
        candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        verdict = False
        for regex, negate in self.rules:
            if any(regex.match(c) for c in candidates):
                verdict = not negate
        return verdict


def _context_files(ignore: DockerIgnore) -> list[str]:
    """The files of the repository that reach the build context."""
    files = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT).as_posix()
        if path.is_file() and not rel.startswith(".git/") and not ignore.excluded(rel):
            files.append(rel)
    return files


def _arg_defaults(instructions) -> dict[str, str]:
    return dict(arg.split("=", 1) for keyword, arg in instructions if keyword == "ARG" and "=" in arg)


def test_dockerfile_base_user_volumes_and_commands():
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    keywords = [k for k, _ in instructions]
    args = _arg_defaults(instructions)

    # an official PyTorch CUDA runtime image, with the torch the tests run (requirements/constraints.txt), which
    # is inside the range pyproject.toml declares, so that pip keeps it
    (base,) = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], a) for k, a in instructions if k == "FROM"]
    torch_pin = re.search(r"^torch==([\d.]+)$", (ROOT / "requirements" / "constraints.txt").read_text(), re.M).group(1)
    assert re.fullmatch(rf"pytorch/pytorch:{re.escape(torch_pin)}-cuda[\d.]+-cudnn\d+-runtime", base), base
    from packaging.requirements import Requirement

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_range,) = [Requirement(r).specifier for r in declared if Requirement(r).name == "torch"]
    assert torch_pin in torch_range and str(torch_range) != f"=={torch_pin}"  # a range, not a pin

    # the project installed from the repository's source, not from a wheel
    runs = " ".join(a for k, a in instructions if k == "RUN")
    assert re.search(r"""pip install (\.|"\.\[[\w,]+\]")(\s|$)""", runs)
    assert ".whl" not in DOCKERFILE.read_text()

    # a non-root user runs everything after the installs
    users = [i for i, (k, _) in enumerate(instructions) if k == "USER"]
    assert users and instructions[users[-1]][1] not in ("root", "0", "0:0")
    assert max(i for i, (k, _) in enumerate(instructions) if k == "RUN") < users[-1]

    # checkpoint and data are volumes, never in the image
    (volumes,) = [a for k, a in instructions if k == "VOLUME"]
    assert {"/data", "/checkpoints", "/outputs"} <= set(re.findall(r'"([^"]+)"', volumes))
    for keyword, arguments in instructions:
        if keyword in ("RUN", "COPY", "ADD"):
            assert not re.search(r"\.pth\b|fbaipublicfiles|sam_vit_", arguments), arguments

    # no entry point: `cobot-med ...` and `python -m monai.bundle ...` are the container's command
    assert "ENTRYPOINT" not in keywords
    (cmd,) = [a for k, a in instructions if k == "CMD"]
    assert cmd.startswith('["cobot-med"')
    assert 'cobot-med = "cobot_med.cli:main"' in (ROOT / "pyproject.toml").read_text()
    # the PostgreSQL driver of the tracking server's backend URI (compose.yaml) is installed
    assert "psycopg" in runs


def test_dockerfile_refers_only_to_files_of_the_repository():
    ignore = DockerIgnore(DOCKERIGNORE.read_text())
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    sources = [s for k, a in instructions if k in ("COPY", "ADD") for s in copy_sources(a)]
    assert sources
    for source in sources:
        assert not re.match(r"https?://", source), "ADD of a URL"
        assert (ROOT / source).exists(), f"COPY source {source} is not in the repository"
        assert source == "." or not ignore.excluded(source), f"COPY source {source} is excluded by .dockerignore"
    # repository files named in RUN commands (relative paths) exist and reach the context
    runs = " ".join(a for k, a in instructions if k == "RUN")
    for name in re.findall(r"(?<![/\w.-])([\w-]+(?:/[\w.-]+)*\.(?:toml|json|txt|cfg|sh|py))\b", runs):
        assert (ROOT / name).is_file() and not ignore.excluded(name), name
    # what `pip install .` and the bundles need is in the context
    context = set(_context_files(ignore))
    for needed in ("pyproject.toml", "README.md", "cobot_med/cli.py", "cobot_med/resources/paper_results.json",
                   "bundles/common.json", "bundles/metadata.json"):
        assert needed in context, needed
    assert not [f for f in context if f.endswith((".pth", ".nii.gz", ".db"))]


def test_dockerignore_keeps_data_outputs_and_environments_out():
    ignore = DockerIgnore(DOCKERIGNORE.read_text())
    for path in ("data/AbdomenCT-1K/Case_00001_0000.nii.gz", "phantoms/adome/img.nii.gz", "outputs/adome/mlflow.db",
                 "checkpoints/sam_vit_b_01ec64.pth", "somewhere/sam_vit_h_4b8939.pth", "mlruns/0/meta.yaml",
                 "mlflow.db", "mlartifacts/1/a/artifacts/x.png", ".venv/bin/python", "venv/lib/site.py",
                 ".git/HEAD", "cobot_med/__pycache__/cli.cpython-311.pyc", "cobot_med.egg-info/PKG-INFO",
                 "runs/x", "cobot-med-demo/phantoms/adome/a.nii.gz"):
        assert ignore.excluded(path), path
    for path in ("pyproject.toml", "cobot_med/cli.py", "bundles/adome.json", "docker/Dockerfile", "README.md",
                 "transforms/x.json", "tests/test_docker.py"):
        assert not ignore.excluded(path), path
    # the matcher itself: negation and single-segment stars
    rules = DockerIgnore("*.md\n!README.md\ndocs/*.txt\n")
    assert rules.excluded("CHANGES.md") and not rules.excluded("README.md") and not rules.excluded("docs/CHANGES.md")
    assert rules.excluded("docs/a.txt") and not rules.excluded("docs/sub/a.txt")


# --------------------------------------------------------------------------------------------------
# compose.yaml


def _interpolate(value, env=None):
    """Compose's ``${VAR}`` / ``${VAR:-default}`` substitution, with ``env`` (default: none set)."""
    env = env or {}
    if isinstance(value, str):
        return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: env.get(m.group(1), m.group(2) or ""), value)
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    return value


def _mounts(service):
    out = {}
    for volume in service.get("volumes", []):
        source, target, *mode = volume.split(":")
        out[target] = (source, mode[0] if mode else "rw")
    return out


def _option(command, name):
    return command[command.index(name) + 1]


def test_compose_services_volumes_and_tracking():
    compose = _interpolate(yaml.safe_load(COMPOSE.read_text()))
    services = compose["services"]
    assert set(services) == {"postgres", "mlflow", "train", "train-node"}
    assert set(compose["volumes"]) == {"postgres-data", "mlflow-artifacts"}

    postgres = services["postgres"]
    assert postgres["image"].startswith("postgres:")
    assert _mounts(postgres)["/var/lib/postgresql/data"][0] == "postgres-data"
    env = postgres["environment"]

    mlflow = services["mlflow"]
    command = mlflow["command"]
    assert command[:2] == ["mlflow", "server"] and "--serve-artifacts" in command
    backend = urlsplit(_option(command, "--backend-store-uri"))
    assert backend.scheme.startswith("postgresql") and backend.hostname == "postgres" and backend.port == 5432
    assert (backend.username, backend.password, backend.path) == (
        env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], "/" + env["POSTGRES_DB"])
    artifacts = _option(command, "--artifacts-destination")
    assert _mounts(mlflow)[artifacts] == ("mlflow-artifacts", "rw")
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    port = _option(command, "--port")
    assert mlflow["ports"] == [f"5000:{port}"]
    allowed = mlflow["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert "mlflow:*" in allowed  # the training service's Host header, mlflow:5000

    root = COMPOSE.parent
    for name in ("train", "train-node", "mlflow"):
        build = services[name]["build"]
        assert (root / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        assert (root / build["context"]).resolve() == ROOT
    train = services["train"]
    assert train["environment"]["MLFLOW_TRACKING_URI"] == f"http://mlflow:{port}"
    assert train["depends_on"]["mlflow"]["condition"] == "service_healthy"
    mounts = _mounts(train)
    assert mounts["/data"][1] == "ro" and mounts["/checkpoints"][1] == "ro" and mounts["/outputs"][1] == "rw"
    (device,) = train["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    node = services["train-node"]
    assert node["network_mode"] == "host" and node["profiles"] == ["multinode"] and _mounts(node) == mounts
    server = _interpolate(yaml.safe_load(COMPOSE.read_text()), {"MLFLOW_TRACKING_URI": "http://srv:5000"})
    assert server["services"]["train-node"]["environment"]["MLFLOW_TRACKING_URI"] == "http://srv:5000"
    # the image mounts what compose mounts
    volumes = " ".join(a for k, a in dockerfile_instructions(DOCKERFILE.read_text()) if k == "VOLUME")
    assert all(target in volumes for target in ("/data", "/checkpoints", "/outputs"))


# --------------------------------------------------------------------------------------------------
# A real PostgreSQL tracking store


def _postgres_uri() -> str:
    uri = os.environ.get("COBOT_MED_TEST_POSTGRES_URI")
    if not uri:
        pytest.skip("no PostgreSQL server: COBOT_MED_TEST_POSTGRES_URI is not set "
                    "(CI sets it with .ci/postgres.sh; locally: export COBOT_MED_TEST_POSTGRES_URI=\"$(.ci/postgres.sh)\")")
    return uri


def _connect(uri: str):
    plain = uri.replace("postgresql+psycopg2://", "postgresql://").replace("postgresql+psycopg://", "postgresql://")
    try:
        import psycopg
    except ImportError:
        import psycopg2

        connection = psycopg2.connect(plain, connect_timeout=5)
        connection.autocommit = True
        return connection
    return psycopg.connect(plain, connect_timeout=5, autocommit=True)


@pytest.fixture
def postgres_store():
    """A fresh database on the server for this test, dropped afterwards."""
    uri = _postgres_uri()
    try:
        admin = _connect(uri)
    except Exception as err:  # the only allowed skip: no server reachable there
        pytest.skip(f"PostgreSQL server at COBOT_MED_TEST_POSTGRES_URI not reachable: {err}")
    name = f"cobot_med_test_{uuid.uuid4().hex[:12]}"
    admin.cursor().execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(uri)
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        try:
            admin.cursor().execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            admin.close()


def _log_training_run(uri, dataset, peft, seed, test_dsc, organs, crash=False):
    """A run logged the way the bundles log one (bundles/common.json): MONAI's MLFlowHandler on the
    trainer (contract params, train_loss per epoch) and on the test evaluator (test_dsc, per organ),
    then ``cobot_med.engine.tracking.mark_finished`` tags it finished, as a training session does."""
    from ignite.engine import Engine, Events
    from monai.handlers import MLFlowHandler

    from cobot_med.engine.tracking import experiment_name, mark_finished, run_name

    experiment, name = experiment_name(dataset), run_name(dataset, peft, "tiny", 64, seed, uuid.uuid4().hex[:8])
    common = {"tracking_uri": uri, "experiment_name": experiment, "run_name": name, "iteration_log": False}
    params = {"dataset": dataset, "peft": peft, "arch": "tiny", "image_size": 64, "seed": seed, "epochs": 1,
              "peft_options": "{}", "image_encoder_trainable": {"lora": 9216, "lora+cobot": 9600}[peft],
              "mask_decoder_trainable": 1000, "total_trainable": 10_000}

    def step(engine, batch):
        if crash:
            raise RuntimeError("out of memory")
        return 1.0 / (engine.state.iteration + 1)

    trainer = Engine(step)
    MLFlowHandler(**common, experiment_param=params, tag_name="train_loss", output_transform=lambda loss: loss,
                  close_on_complete=False).attach(trainer)
    try:
        trainer.run([0, 1], max_epochs=1)
    except RuntimeError:
        return None

    evaluator = Engine(lambda engine, batch: None)

    @evaluator.on(Events.EPOCH_COMPLETED)
    def metrics(engine):
        engine.state.metrics.update({"test_dsc": test_dsc, "test_slice_dsc": test_dsc + 0.02,
                                     **{f"test_dsc_{organ}": value for organ, value in organs.items()}})

    MLFlowHandler(**common, close_on_complete=False).attach(evaluator)
    evaluator.run([0], max_epochs=1)
    mark_finished(uri, experiment, name)
    return name


def test_tracking_and_compare_on_postgresql(postgres_store, tmp_path, capsys):
    uri = postgres_store
    logged = {}
    for peft, values in {"lora": (0.61, 0.65), "lora+cobot": (0.66, 0.71)}.items():
        for seed, dsc in enumerate(values):
            organs = {"liver": dsc + 0.1, "spleen": dsc - 0.1}
            _log_training_run(uri, "adome", peft, seed, dsc, organs)
            logged.setdefault(peft, []).append((dsc, organs))
    assert _log_training_run(uri, "adome", "lora", 2, 0.0, {}, crash=True) is None

    out = tmp_path / "compare"
    assert cli.main(["compare", "--tracking-uri", uri, "--experiment", "cobot-med/adome", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    table = text.split("## Test DSC (%) per method", 1)[1].split("\n## ", 1)[0]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in table.splitlines() if line.startswith("| lora")}
    assert list(rows) == ["lora", "lora+cobot"]
    for peft, runs in logged.items():
        values = [100 * dsc for dsc, _ in runs]
        expected = f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"
        assert rows[peft][3 + 1] == expected, rows[peft]  # method, arch, params, paper params, adome
        liver = [100 * organs["liver"] for _, organs in runs]
        assert f"| {peft} | {statistics.mean(liver):.1f} ± {statistics.stdev(liver):.1f} |" in text
    assert rows["lora"][2] == "9.2" and rows["lora+cobot"][2] == "9.6"
    # the crashed run is named among those left out
    left_out = text.split("## Runs left out", 1)[1]
    assert "adome-lora-tiny-64-seed2" in left_out and "adome/lora seed 2" in left_out
    for name in ("compare.md", "methods.csv", "organs.csv", "runs.csv", "dsc_vs_params.png", "organ_dsc.png"):
        assert (out / name).stat().st_size > 0, name
