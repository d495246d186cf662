"""How long an S3 target takes to give up on a dead endpoint, per kind of death.

Puts a FaultProxy (tests/faults.py) in refuse, reset and blackhole mode in front of a real
``rclone serve s3``, opens a target through ``open_target`` with the given settings (default:
the shipped defaults) and times one GET of the repository's config object, which is what
opening a repository -- and so the daemon's start-up -- does first. The modes run
concurrently, so the whole run takes about as long as the slowest mode. More connections than
requests means the S3 SDK retried on its own inside a request.

    .venv/bin/python tools/fault_give_up.py                       # shipped defaults (~6 min)
    .venv/bin/python tools/fault_give_up.py --timeout 5 --give-up-after 30
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from replicator.config import target_config
from replicator.errors import ReplicatorError
from replicator.targets import open_target
from tests.faults import FaultProxy, ProxyMode
from tests.servers import RcloneServer, isolate_aws_environment

MODES: tuple[ProxyMode, ...] = ("refuse", "reset", "blackhole")


def measure(proxy: FaultProxy, bucket: str, overrides: dict[str, Any], out: dict[str, str]) -> None:
    attempts: list[float] = []  # when each request started, seconds after the first

    def count(_target: str, _op: str, _nbytes: int) -> None:
        attempts.append(time.monotonic())

    async def go() -> str:
        cfg = target_config(
            {"name": "t", "url": f"s3://{bucket}/r", "endpoint_url": proxy.endpoint, **overrides}
        )
        started = time.monotonic()
        target = await open_target(cfg, on_request=count)
        try:
            await target.get("config.json")
            outcome = "succeeded?!"
        except ReplicatorError as exc:
            outcome = f"{type(exc).__name__} (exit {exc.exit_code}): {exc}"
        finally:
            await target.close()
        starts = " ".join(f"{a - started:.1f}" for a in attempts)
        return (
            f"gave up after {time.monotonic() - started:.1f} s; our requests began at [{starts}] s; "
            f"the proxy saw {proxy.stats.connections} connections; {outcome}"
        )

    out[proxy.mode] = asyncio.run(go())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, help="target timeout (default: the config default)")
    parser.add_argument("--give-up-after", type=float, help="retry.give_up_after (default: config default)")
    args = parser.parse_args()
    overrides: dict[str, Any] = {}
    if args.timeout is not None:
        overrides["timeout"] = args.timeout
    if args.give_up_after is not None:
        overrides["retry"] = {"give_up_after": args.give_up_after}
    defaults = target_config({"name": "x", "url": "/x"})
    print(
        f"timeout {overrides.get('timeout', defaults.timeout)} s, retry "
        f"{defaults.retry.model_copy(update=overrides.get('retry', {}))}",
        flush=True,
    )
    isolate_aws_environment()
    with tempfile.TemporaryDirectory() as tmp:
        server = RcloneServer(Path(tmp)).start()
        try:
            bucket = server.new_bucket()
            results: dict[str, str] = {}
            proxies = [FaultProxy.for_server(server) for _ in MODES]
            threads = []
            for proxy, mode in zip(proxies, MODES, strict=True):
                proxy.set_mode(mode)
                threads.append(threading.Thread(target=measure, args=(proxy, bucket, overrides, results)))
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for proxy in proxies:
                proxy.close()
            for mode in MODES:
                print(f"{mode:9} {results.get(mode, 'no result')}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
