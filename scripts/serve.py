"""Run the local stack in the foreground: a Triton fleet, then the gateway in front of it.

Ctrl-C (or SIGTERM) stops the gateway first, then every Triton instance, and exits 0; so does
SIGINT sent to a run in the background, where the shell started it with SIGINT ignored. The
gateway first finishes the requests in flight; another Ctrl-C meanwhile stops it at once. Either
way the fleet is stopped too.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "triton"))

import fleet  # noqa: E402  (triton/fleet.py: triton/ is deliberately not a package)

from gateway.config import ConfigError, load_config  # noqa: E402


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(ROOT / "configs" / "local.toml"))
    parser.add_argument("--repository", default=str(ROOT / "model_repository"))
    args = parser.parse_args()
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"serve: bad configuration: {exc}", file=sys.stderr)
        return 2
    ports = [urlsplit(i.url).port for i in config.upstream.instances]
    base = min(p for p in ports if p is not None)
    if sorted(ports) != list(range(base, base + len(ports))):
        print("serve: the config's instances must be consecutive local ports to run them here", file=sys.stderr)
        return 2

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    # Even when started with SIGINT ignored (a background job): the gateway, which installs its
    # own handlers, stops on it, and the fleet must stop with it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # With [repository] path set the gateway drives loading: Triton starts empty, in explicit
    # model-control mode, and the gateway loads and warms every model before it takes traffic.
    managed = bool(config.repository.path)
    repository = Path(config.repository.path) if managed else Path(args.repository)
    triton = fleet.Fleet(
        repository,
        instances=len(ports),
        base_http=base,
        base_grpc=config.upstream.instances[0].grpc_port or base + 100,
        base_metrics=base + 200,
        model_control_mode="explicit" if managed else "poll",
        auto_complete_config=not managed,
    )
    gateway: subprocess.Popen[bytes] | None = None
    try:
        print(f"serve: starting {len(ports)} Triton instance(s) on ports {ports}...", flush=True)
        triton.start()
        triton.wait_ready(180)
        print(f"serve: Triton ready (logs in {triton.log_dir})", flush=True)
        gateway = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", args.config], cwd=ROOT)
        url = f"http://{config.server.host}:{config.server.port}"
        if managed:
            print(f"serve: the gateway loads {repository} onto the fleet...", flush=True)
        while gateway.poll() is None and not answers(url + "/v2/health/ready"):
            time.sleep(0.2)
        if gateway.poll() is None:
            print(f"serve: gateway on {url}  (Ctrl-C stops everything)", flush=True)
        while gateway.poll() is None:
            time.sleep(0.5)
        print(f"serve: the gateway exited with status {gateway.returncode}", file=sys.stderr)
        rc = gateway.returncode
        return rc if rc > 0 else 128 - rc if rc < 0 else 1  # it was not asked to stop
    except KeyboardInterrupt:
        print("\nserve: stopping", flush=True)
        return 0
    except fleet.FleetError as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 1
    finally:
        stop(gateway, triton, config.server.shutdown_grace_s + 10)


def stop(gateway: subprocess.Popen[bytes] | None, triton: fleet.Fleet, grace: float) -> None:
    """Stop the gateway, letting it finish the requests in flight for up to ``grace`` seconds,
    then the fleet. Another Ctrl-C or SIGTERM meanwhile hurries the gateway (a second SIGINT
    makes uvicorn quit at once) and never interrupts the stopping itself."""

    def hurry(signum: int, frame: object) -> None:
        if gateway is not None and gateway.poll() is None:
            print("serve: stopping now, without waiting for the requests in flight", flush=True)
            gateway.send_signal(signal.SIGINT)

    signal.signal(signal.SIGINT, hurry)
    signal.signal(signal.SIGTERM, hurry)
    if gateway is not None and gateway.poll() is None:
        # SIGTERM, not SIGINT: after Ctrl-C the gateway already has one SIGINT, and a second
        # makes uvicorn quit at once instead of finishing the requests in flight.
        gateway.send_signal(signal.SIGTERM)
        try:
            gateway.wait(grace)
        except subprocess.TimeoutExpired:
            gateway.kill()
            gateway.wait()
    triton.stop()


if __name__ == "__main__":
    sys.exit(main())
