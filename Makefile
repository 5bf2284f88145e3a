# `make test` runs every check CI runs; `.ci/run` installs what a fresh machine lacks, then calls it.
.PHONY: test fmt clippy cargo-test autobahn deploy-checks

test: fmt clippy cargo-test autobahn deploy-checks

fmt:
	cargo fmt --all -- --check

clippy:
	cargo clippy --workspace --all-targets --locked -- -D warnings

cargo-test:
	cargo test --workspace --locked

# Autobahn|Testsuite fuzzing client, cases 1-10, against the gateway's /ws/echo endpoint.
autobahn:
	bash .ci/autobahn/gateway.sh

# Dockerfile, compose, Kubernetes base, Helm chart, Prometheus rules: linted and validated offline.
deploy-checks:
	bash .ci/deploy-checks.sh
