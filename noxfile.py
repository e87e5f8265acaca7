"""The test suites, each in the environment its users install (``pip install nox && nox``).

- ``tests``: the core, as ``pip install -e .`` resolves it for a user (numpy 2, no monailabel), plus the
  ``test`` extra and the ``infer`` extra (ONNX Runtime and OpenVINO, for the export tests), at the exact versions
  of ``requirements/constraints.txt``.
- ``monailabel``: the MONAI Label app's tests, with the ``monailabel`` extra (which brings numpy 1.26 and
  pydicom 2) and ``browser`` (Selenium), at the versions of ``requirements/constraints-monailabel.txt``, and the
  DICOM-SEG writer's tests again (``BOTH``: highdicom 0.22 on pydicom 2 there, the newest on pydicom 3 in
  ``tests``). Its DICOMweb and browser tests read ``COBOT_MED_TEST_ORTHANC_URL`` and
  ``COBOT_MED_TEST_CHROMEDRIVER`` (``.ci/orthanc.sh``, ``.ci/chromium.sh``) and ``CI`` from the caller's
  environment, which nox passes on to every session.

Arguments after ``--`` go to pytest: ``nox -s tests -- -m "not slow"`` is the fast tier. The environments
are kept between runs (``.nox/``); ``nox -R`` also skips the install step.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "monailabel"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

MONAI_LABEL_TESTS = ["tests/test_monailabel.py", "tests/test_monailabel_parts.py", "tests/test_monailabel_dicomweb.py"]
# run in both sessions: the DICOM-SEG writer on pydicom 3 / highdicom 0.28 and pydicom 2 / highdicom 0.22
BOTH = ["tests/test_dicom_seg.py"]


@nox.session
def tests(session: nox.Session) -> None:
    """The core suite on the user's own resolution."""
    session.install("-e", ".[test,infer]", "-c", "requirements/constraints.txt")
    session.run("python", "-m", "pytest", "-q", *[f"--ignore={path}" for path in MONAI_LABEL_TESTS],
                *session.posargs, env={"COBOT_MED_REQUIRE_RUNTIMES": "1"})


@nox.session
def monailabel(session: nox.Session) -> None:
    """The MONAI Label app's suite, with the ``monailabel`` extra."""
    session.install("-e", ".[test,monailabel,browser]", "-c", "requirements/constraints-monailabel.txt")
    session.run("python", "-m", "pytest", "-q", *MONAI_LABEL_TESTS, *BOTH, *session.posargs,
                env={"COBOT_MED_REQUIRE_MONAILABEL": "1"})
