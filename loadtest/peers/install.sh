#!/usr/bin/env bash
# Installs the peers' npm packages (versions pinned by package-lock.json) into
# loadtest/peers/node_modules. Idempotent: does nothing when node_modules already matches the lock.
set -euo pipefail
cd "$(dirname "$0")"

command -v npm >/dev/null 2>&1 || { echo "install.sh: npm not found (install Node.js 20 and npm)" >&2; exit 1; }

# npm ci leaves node_modules/.package-lock.json, the packages it installed; when every package of
# the committed lock is there at its version there is nothing to do.
if [ -f node_modules/.package-lock.json ] && node -e '
     const a = require("./package-lock.json").packages, b = require("./node_modules/.package-lock.json").packages;
     for (const k of Object.keys(a)) if (k && (!b[k] || b[k].version !== a[k].version)) process.exit(1);
   ' 2>/dev/null; then
  exit 0
fi
npm ci --no-audit --no-fund
