#!/usr/bin/env bash
# Headless Chromium and its WebDriver for the browser test of the MONAI Label app (tests/test_monailabel_dicomweb.py).
#
# Installs Debian's `chromium` and `chromium-driver` (the driver is built from the same source, so their versions
# always match, which a pip-installed driver cannot promise) when either is missing, and prints the driver's
# path as the last line on stdout; everything else goes to stderr. Idempotent. Exits non-zero when they could not
# be installed, so that the caller (.ci/run) decides what that means. A script of its own, not part of
# orthanc.sh: the DICOMweb tests need Orthanc without a browser, and a browser is 300 MB they need not wait for.
#
#   driver="$(.ci/chromium.sh | tail -n 1)" && export COBOT_MED_TEST_CHROMEDRIVER="$driver"
#
# Settings (environment): COBOT_MED_CHROMIUM_APT_TIMEOUT (seconds per apt step, default 600).
set -uo pipefail

APT_TIMEOUT="${COBOT_MED_CHROMIUM_APT_TIMEOUT:-600}"
export DEBIAN_FRONTEND=noninteractive

log() { echo "chromium.sh: $*" >&2; }
die() { log "$*"; exit 1; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo -n "$@"
    else return 1
    fi
}

installed() { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; }

if ! installed; then
    log "installing chromium and chromium-driver from Debian's packages"
    as_root timeout "$APT_TIMEOUT" apt-get update -qq >&2 \
        || die "apt-get update failed or took longer than ${APT_TIMEOUT}s (root or sudo -n needed)"
    as_root timeout "$APT_TIMEOUT" apt-get install -y -qq --no-install-recommends \
        -o DPkg::Lock::Timeout=60 chromium chromium-driver >&2 \
        || die "apt-get install chromium chromium-driver failed or took longer than ${APT_TIMEOUT}s"
    installed || die "chromium or chromedriver is still not on PATH"
fi
log "$(chromium --version 2>/dev/null | head -n 1); $(chromedriver --version 2>/dev/null | head -n 1)"
command -v chromedriver
