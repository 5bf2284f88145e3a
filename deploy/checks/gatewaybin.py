"""Runs the real gateway binary on a configuration to prove it accepts it.

The gateway has no "check the configuration" flag, so the check starts it: a configuration it
rejects makes it exit at once with status 2 and "invalid configuration: ..."; one it accepts
gets as far as starting (or failing to reach Redis, which is not a configuration error). Redis
is redirected to 127.0.0.1:1 (nothing listens there) and the node listens on 127.0.0.1:0, so the
check sends no traffic anywhere but loopback.
"""

import os
import signal
import subprocess
import tempfile
import time


def check_config(gateway_bin, toml_text=None, env=None, label="config"):
    """Returns None when the gateway accepts the configuration, else its complaint."""
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY__")}
    run_env.update(env or {})
    run_env["RUST_LOG"] = "error"
    args = [gateway_bin, "--listen", "127.0.0.1:0"]
    path = None
    if toml_text is not None:
        fd, path = tempfile.mkstemp(prefix="gateway-", suffix=".toml")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(toml_text)
        args += ["--config", path]
    # Keep the Redis target shape (url vs cluster_nodes are exclusive) but point it at loopback.
    text = (toml_text or "") + "".join(f"{k}={v}\n" for k, v in run_env.items())
    if "cluster_nodes" in text or "GATEWAY__REDIS__CLUSTER_NODES" in text:
        args += ["--redis-cluster-nodes", "127.0.0.1:1"]
    elif "sentinel_master" in text:
        # The sentinels' addresses carry the password, so the chart passes them in the environment.
        args += ["--redis-sentinel-nodes", "127.0.0.1:1"]
    elif "url" in text or "GATEWAY__REDIS__URL" in text:
        args += ["--redis-url", "redis://127.0.0.1:1"]
    proc = subprocess.Popen(args, env=run_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        if proc.poll() is None:
            return None  # running: configuration accepted
        stderr = proc.stderr.read().decode(errors="replace")
        if proc.returncode == 2 or "invalid configuration" in stderr:
            return f"{label}: the gateway rejects it: {stderr.strip()}"
        return None  # started, then failed on something else (Redis unreachable): config fine
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if path:
            os.unlink(path)
