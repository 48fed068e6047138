"""Real test services as child processes: moto_server (S3) and mlflow server.

Each runs in its own process group on a free loopback port, so teardown kills the whole group and no
process outlives the test session.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    name: str
    url: str
    proc: subprocess.Popen
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=5)


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"service exited with {proc.returncode}; log {log}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception:
            time.sleep(0.3)
    raise TimeoutError(f"{url} not up after {timeout}s; log {log}:\n{log.read_text()[-3000:]}")


def _start(name: str, cmd: list[str], health: str, url: str, workdir: Path, env: dict | None,
           timeout: float) -> Service:
    log = workdir / f"{name}.log"
    fh = open(log, "wb")
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=workdir,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    svc = Service(name, url, proc, log)
    try:
        _wait_http(health, proc, log, timeout)
    except Exception:
        svc.stop()
        raise
    return svc


def start_moto(workdir: Path, timeout: float = 60) -> Service:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    return _start("moto", [_bin("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                  f"{url}/moto-api/", url, workdir, None, timeout)


def start_mlflow(workdir: Path, artifacts: str | None = None, env: dict | None = None, timeout: float = 120) -> Service:
    """The deployment's own server command (infra/mlflow/serve.sh) with a sqlite backend on loopback;
    artifacts go to `artifacts` (e.g. an s3:// URI on the moto fixture) or a local folder."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    art = workdir / "mlflow-artifacts"
    art.mkdir(exist_ok=True)
    script = Path(__file__).resolve().parents[1] / "infra" / "mlflow" / "serve.sh"
    env = {**(env or {}), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{workdir / 'mlflow.db'}",
           "MLFLOW_ARTIFACTS_DESTINATION": artifacts or art.as_uri(),
           "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "1"}
    return _start("mlflow", ["bash", str(script)], f"{url}/health", url, workdir, env, timeout)


@dataclass
class RayHead:
    """A Ray head started with `ray start --head` on loopback in its own temp dir, as an ops engineer
    starts one: its processes are found by that dir and port (Ray daemonizes them), so stop() ends this
    cluster only, never the session's other Ray instances."""
    address: str
    dashboard_url: str
    temp_dir: Path
    port: int
    log: Path

    def processes(self):
        import psutil

        roots = []
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if str(self.temp_dir) in cmd or f":{self.port}" in cmd:
                roots.append(p)
        found = {p.pid: p for p in roots}
        for p in roots:
            try:
                found.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
        found.pop(os.getpid(), None)
        return list(found.values())

    def stop(self) -> None:
        import psutil

        procs = self.processes()
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_ray_head(workdir: Path, num_cpus: int = 0, autoscaling_config: Path | None = None,
                   env: dict | None = None, port: int | None = None, timeout: float = 90,
                   auth_token: str | None = None) -> RayHead:
    """`ray start --head` with every port chosen free (GCS, dashboard, client server, agent), so it can
    run beside the session's cluster. With `autoscaling_config`, Ray's fake multi-node provider adds and
    removes nodes as a cloud provider would. With `auth_token`, Ray token authentication is on (as it is
    by default from Ray 2.61): every client must present the token."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's socket paths have a limit
    port, dash = port or free_port(), free_port()
    cmd = [_bin("ray"), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
           f"--temp-dir={temp_dir}", f"--num-cpus={num_cpus}", "--include-dashboard=true",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={free_port()}",
           f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"]
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": auth_token} if auth_token else {"RAY_AUTH_MODE": "disabled"}
    full_env = {**os.environ, **auth, **(env or {})}
    if autoscaling_config is not None:
        cmd.append(f"--autoscaling-config={autoscaling_config}")
        full_env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
    log = workdir / "ray-head.log"
    head = RayHead(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", temp_dir, port, log)
    with open(log, "wb") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=full_env, timeout=timeout).returncode
    if rc != 0:
        head.stop()
        raise RuntimeError(f"ray start --head exited with {rc}; log {log}:\n{log.read_text()[-3000:]}")
    return head
