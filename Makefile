# `make test` runs every check CI runs; `.ci/run` installs what a fresh machine lacks, then calls it.
.PHONY: test fmt clippy cargo-test client-js browser autobahn deploy-checks api-contract

test: fmt clippy cargo-test client-js browser autobahn deploy-checks api-contract

fmt:
	cargo fmt --all -- --check

clippy:
	cargo clippy --workspace --all-targets --locked -- -D warnings

# Unit tests, the gateway's integration tests (gateway/tests/it, one binary), the deploy files'
# tests (deploy/tests: real nginx and Prometheus), loadtest's smoke and peers tests; all on testkit/.
cargo-test:
	cargo test --workspace --locked

# The JavaScript client (clients/js): dependencies from its lock file (npm registry only), then its
# unit tests on node's test runner.
client-js:
	cd clients/js && npm ci --no-audit --no-fund --loglevel=error && npm test

# The demo page and the client in Debian's Chromium (playwright-core), against gateway nodes and a
# redis-server the tests start on free ports. Screenshots: target/artifacts/demo*.png.
browser: client-js
	cargo build --locked -p gateway --bin gateway
	cd clients/js && npm run test:browser

# Autobahn|Testsuite fuzzing client, cases 1-10, 12 and 13 (permessage-deflate), against the
# gateway's /ws/echo endpoint.
autobahn:
	bash .ci/autobahn/gateway.sh

# Dockerfile, compose, Kubernetes base, Helm chart, Prometheus rules: linted and validated offline.
deploy-checks:
	bash .ci/deploy-checks.sh

# Schemathesis against a live node, from the node's own OpenAPI document (/api/openapi.json, kept
# in gateway/src/http/openapi.json): every check, no failure allowed.
api-contract:
	bash .ci/api-contract/run.sh
