#!/usr/bin/env bash
# Create .venv-openpi with the unmodified openpi-client 0.1.2 from PyPI, for the compatibility test
# in tests/test_serving.py. It needs numpy<2, so it cannot share .venv (numpy 2). Its import of
# typing_extensions is not declared in its metadata, so that is installed too.
# Without network the venv is not created, the reason goes to .venv-openpi.failed, and that
# test skips saying so; the rest of the suite is unaffected.
#   OPENPI_VENV  where to create it (default .venv-openpi)
#   PYTHON       interpreter to build it from (default python3)
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${OPENPI_VENV:-.venv-openpi}
PYTHON=${PYTHON:-python3}
FAILED="$VENV.failed"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import openpi_client, numpy; assert numpy.__version__ < '2'" 2>/dev/null; then
  exit 0
fi
rm -rf "$VENV" "$FAILED"
log=$(mktemp)
if "$PYTHON" -m venv "$VENV" >"$log" 2>&1 \
  && "$VENV/bin/python" -m pip install -q --disable-pip-version-check "openpi-client==0.1.2" "numpy<2" typing_extensions >>"$log" 2>&1 \
  && "$VENV/bin/python" -c "import openpi_client.websocket_client_policy" >>"$log" 2>&1; then
  echo "setup_openpi_venv: $VENV ready (openpi-client 0.1.2)"
  rm -f "$log"
  exit 0
fi
rm -rf "$VENV"
{ echo "setup_openpi_venv failed $(date -u +%FT%TZ):"; tail -n 5 "$log"; } >"$FAILED"
rm -f "$log"
echo "setup_openpi_venv: could not create $VENV (see $FAILED); the openpi compatibility test will skip" >&2
exit 1
