#!/usr/bin/env bash
# .ci/autobahn/setup.sh — owns the Autobahn|Testsuite toolchain for CI.
#
# Creates (idempotently) a Python 2.7 virtualenv at ${AUTOBAHN_VENV:-/tmp/autobahn-venv}
# from pyenv's Python 2.7.18 and installs wstest (autobahntestsuite) with pinned
# dependencies from PyPI. Does nothing if "$AUTOBAHN_VENV/bin/wstest --help" already works.
#
# Needs: pyenv Python 2.7.18 (UCS4 build, i.e. cp27mu) and PyPI. Every package with C code
# (Twisted, cryptography, cffi, zope.interface, MarkupSafe) comes as a cp27mu manylinux
# wheel; the few sdists (autobahn, txaio, ...) are pure Python, so no compiler,
# libssl-dev or libffi-dev is needed. About 30 s on a fresh machine, <1 s when already set up.
set -euo pipefail

VENV="${AUTOBAHN_VENV:-/tmp/autobahn-venv}"

log() { printf 'autobahn-setup: %s\n' "$*" >&2; }

# wsaccel: autobahn's C masking and UTF-8 validation. Without it wstest masks every byte in
# Python and the 32–128 KiB cases of 12.*/13.* (permessage-deflate) take minutes each; with it
# all of 12.* and 13.* fit in make test. Built from its sdist (gcc and the pyenv headers).
WSACCEL='wsaccel==0.6.2'
install_wsaccel() {
  log "installing $WSACCEL (C masking for wstest)"
  "$VENV/bin/python" -m pip install --quiet "$WSACCEL"
}

if [ -x "$VENV/bin/wstest" ] && "$VENV/bin/wstest" --help >/dev/null 2>&1; then
  "$VENV/bin/python" -c 'import wsaccel' >/dev/null 2>&1 || install_wsaccel
  log "wstest already working in $VENV; nothing to do"
  exit 0
fi

# --- locate Python 2.7.18 --------------------------------------------------------------
PY27=""
for cand in \
  "/root/.pyenv/versions/2.7.18/bin/python2.7" \
  "${PYENV_ROOT:-}/versions/2.7.18/bin/python2.7" \
  "$(pyenv root 2>/dev/null || true)/versions/2.7.18/bin/python2.7"; do
  case "$cand" in /versions/*) continue ;; esac
  if [ -x "$cand" ]; then PY27="$cand"; break; fi
done
if [ -z "$PY27" ]; then
  log "Python 2.7.18 not found (looked in /root/.pyenv and \$(pyenv root)); install it with: pyenv install 2.7.18"
  exit 1
fi
log "using $PY27"

export PIP_DISABLE_PIP_VERSION_CHECK=1
export PYTHONWARNINGS="ignore:DEPRECATION"

# --- virtualenv (<20.22 can still create Python 2.7 envs; pip 19.2 on py2.7 picks 20.15.x) ---
if ! "$PY27" -m pip --version >/dev/null 2>&1; then
  log "bootstrapping pip for $PY27"
  "$PY27" -m ensurepip --default-pip >/dev/null
fi
if ! "$PY27" -c 'import virtualenv, sys; v = tuple(int(x) for x in virtualenv.__version__.split(".")[:2]); sys.exit(0 if v < (20, 22) else 1)' >/dev/null 2>&1; then
  log "installing virtualenv<20.22 into $PY27"
  site="$("$PY27" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  if [ -w "$site" ]; then
    "$PY27" -m pip install --quiet 'virtualenv<20.22'
  else
    "$PY27" -m pip install --quiet --user 'virtualenv<20.22'
  fi
fi

# --- the venv ----------------------------------------------------------------------------
# A half-built venv from an earlier failed run is thrown away and rebuilt.
if [ -e "$VENV" ]; then
  if [ -f "$VENV/pyvenv.cfg" ] || [ -f "$VENV/bin/activate" ] || [ -z "$(ls -A "$VENV" 2>/dev/null)" ]; then
    log "removing incomplete venv at $VENV"
    rm -rf "$VENV"
  else
    log "$VENV exists and is not a virtualenv; refusing to delete it (set AUTOBAHN_VENV elsewhere)"
    exit 1
  fi
fi
log "creating venv at $VENV"
"$PY27" -m virtualenv --quiet --python "$PY27" "$VENV"

log "installing autobahntestsuite and pinned deps (~30 s)"
"$VENV/bin/python" -m pip install --quiet --prefer-binary \
  'Twisted==19.10.0' \
  'autobahn[twisted]==0.10.9' \
  'autobahntestsuite==25.10.1' \
  'cryptography==3.3.2' \
  'pyOpenSSL==19.1.0' \
  'txaio==2.1.0' \
  'klein==17.10.0' \
  'jinja2==2.11.3' \
  'markupsafe==1.1.1' \
  'Werkzeug==1.0.1' \
  'service_identity==18.1.0' \
  'unittest2==1.1.0' \
  'zope.interface==4.6.0' \
  'incremental==16.10.1' \
  'six==1.16.0'

install_wsaccel

if ! "$VENV/bin/wstest" --help >/dev/null; then
  log "wstest --help failed after install"
  exit 1
fi
log "ok: $("$VENV/bin/python" -c 'import autobahntestsuite, autobahn, twisted; print("autobahntestsuite %s, autobahn %s, Twisted %s" % (autobahntestsuite.__version__, autobahn.__version__, twisted.__version__))' 2>/dev/null || echo 'wstest ready')"
