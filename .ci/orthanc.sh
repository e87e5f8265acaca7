#!/usr/bin/env bash
# A local Orthanc with its DICOMweb plugin for the MONAI Label DICOMweb tests (tests/test_monailabel_dicomweb.py).
#
# Installs Orthanc and its DICOMweb plugin from Debian's packages when they are missing, starts a server of its
# own (its own configuration, storage and log under a state folder; HTTP on 127.0.0.1 only, no login, no DICOM
# port) when none answers there yet, waits until `/dicom-web/studies` answers, and prints the DICOMweb URL as the
# last line on stdout; everything else goes to stderr. Idempotent: a second call finds the server and prints its
# URL. Exits non-zero when no server could be set up, so that the caller (.ci/run) decides what that means.
#
#   url="$(.ci/orthanc.sh | tail -n 1)" && export COBOT_MED_TEST_ORTHANC_URL="$url"
#
# Settings (environment): COBOT_MED_TEST_ORTHANC_URL (an existing server: only checked, printed),
# COBOT_MED_ORTHANC_PORT (HTTP port, default 8042), COBOT_MED_ORTHANC_DIR (state folder, default
# /tmp/cobot-med-orthanc), COBOT_MED_ORTHANC_APT_TIMEOUT (seconds per apt step, default 300),
# COBOT_MED_ORTHANC_START_TIMEOUT (seconds to wait for the server, default 60).
set -uo pipefail

PORT="${COBOT_MED_ORTHANC_PORT:-8042}"
STATE="${COBOT_MED_ORTHANC_DIR:-/tmp/cobot-med-orthanc}"
APT_TIMEOUT="${COBOT_MED_ORTHANC_APT_TIMEOUT:-300}"
START_TIMEOUT="${COBOT_MED_ORTHANC_START_TIMEOUT:-60}"
HOST=127.0.0.1
URL="http://$HOST:$PORT/dicom-web"
export DEBIAN_FRONTEND=noninteractive

log() { echo "orthanc.sh: $*" >&2; }
die() { log "$*"; exit 1; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo -n "$@"
    else return 1
    fi
}

answers() {  # answers URL: true when QIDO-RS answers there with a JSON list
    command -v curl >/dev/null 2>&1 || return 1
    curl -sf --max-time 5 -H 'Accept: application/dicom+json' "$1/studies" 2>/dev/null | head -c 1 | grep -q '\['
}

if [ -n "${COBOT_MED_TEST_ORTHANC_URL:-}" ]; then
    answers "$COBOT_MED_TEST_ORTHANC_URL" || die "COBOT_MED_TEST_ORTHANC_URL is set but $COBOT_MED_TEST_ORTHANC_URL/studies does not answer"
    echo "$COBOT_MED_TEST_ORTHANC_URL"
    exit 0
fi
if answers "$URL"; then
    log "a DICOMweb server already answers at $URL"
    echo "$URL"
    exit 0
fi

# Debian's orthanc-dicomweb puts the plugin here (the package's /usr/share/orthanc/plugins/ link to
# /usr/lib/orthanc/libOrthancDicomWeb.so.VERSION); Orthanc loads only the plugins its configuration names.
plugin() { ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so /usr/lib/orthanc/libOrthancDicomWeb.so* 2>/dev/null | head -n 1; }
installed() { command -v Orthanc >/dev/null 2>&1 && [ -n "$(plugin)" ] && command -v curl >/dev/null 2>&1; }

if ! installed; then
    log "installing orthanc and orthanc-dicomweb from Debian's packages"
    as_root timeout "$APT_TIMEOUT" apt-get update -qq >&2 \
        || die "apt-get update failed or took longer than ${APT_TIMEOUT}s (root or sudo -n needed)"
    as_root timeout "$APT_TIMEOUT" apt-get install -y -qq --no-install-recommends \
        -o DPkg::Lock::Timeout=60 orthanc orthanc-dicomweb curl >&2 \
        || die "apt-get install orthanc orthanc-dicomweb failed or took longer than ${APT_TIMEOUT}s"
    installed || die "Orthanc or its DICOMweb plugin is still not installed"
fi

mkdir -p "$STATE/db" || die "cannot create $STATE"
cat >"$STATE/orthanc.json" <<EOF
{
  "Name": "cobot-med-test",
  "StorageDirectory": "$STATE/db",
  "IndexDirectory": "$STATE/db",
  "Plugins": ["$(plugin)"],
  "HttpServerEnabled": true,
  "HttpPort": $PORT,
  "RemoteAccessAllowed": false,
  "AuthenticationEnabled": false,
  "DicomServerEnabled": false,
  "HttpDescribeErrors": true,
  "StableAge": 1,
  "DicomWeb": {"Enable": true, "Root": "/dicom-web/", "EnableWado": true, "WadoRoot": "/wado", "Ssl": false,
               "StudiesMetadata": "Full", "SeriesMetadata": "Full"}
}
EOF

log "starting Orthanc on $HOST:$PORT (configuration, storage and log in $STATE)"
nohup Orthanc "$STATE/orthanc.json" >"$STATE/orthanc.log" 2>&1 </dev/null &
echo $! >"$STATE/orthanc.pid"
for _ in $(seq "$START_TIMEOUT"); do
    answers "$URL" && break
    kill -0 "$(cat "$STATE/orthanc.pid")" 2>/dev/null || die "Orthanc exited: $(tail -n 5 "$STATE/orthanc.log")"
    sleep 1
done
answers "$URL" || die "Orthanc on $HOST:$PORT does not answer $URL/studies after ${START_TIMEOUT}s: $(tail -n 5 "$STATE/orthanc.log")"
log "ready: $URL (pid $(cat "$STATE/orthanc.pid"))"
echo "$URL"
