"""Entry point of an instance process (what the local launcher starts):

    python -m serving.instance.main --name decode-0 --role decode --config-stdin < start.json

where start.json is one JSON document, `{"config": Config.to_dict(), "token": ...}` (`encode_start`):
the config and the deployment's token come on stdin, never on the command line, which any local user
can read.

Once serving, it prints one line `READY_PREFIX {"address": ..., "info": base64(InstanceInfo)}` on
stdout (its logs go to stderr) and runs until SIGTERM/SIGINT, or until its parent process is gone, so
that a launcher killed without cleaning up leaves no instance behind. A signal drains first (running
requests finish, for at most --shutdown-timeout); a second signal, or a gone parent (nobody is left
to answer), skips the drain. It exits 0.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import signal
import sys

from serving.config import Config
from serving.instance._proto import instance_pb2 as pb
from serving.instance.servicer import InstanceAddress, InstanceSpec, serve_instance

READY_PREFIX = "pdserve-instance-ready"
_PARENT_CHECK_S = 1.0


def encode_ready(ready: InstanceAddress) -> str:
    info = base64.b64encode(ready.info.SerializeToString()).decode()
    return f"{READY_PREFIX} {json.dumps({'address': ready.address, 'info': info})}"


def decode_ready(line: str) -> InstanceAddress | None:
    """The InstanceAddress of a ready line; None for any other line."""
    if not line.startswith(READY_PREFIX + " "):
        return None
    values = json.loads(line[len(READY_PREFIX) + 1:])
    return InstanceAddress(values["address"], pb.InstanceInfo.FromString(base64.b64decode(values["info"])))


def encode_start(spec: InstanceSpec) -> str:
    """What the launcher writes to an instance's stdin: its config and the deployment's token."""
    return json.dumps({"config": spec.config.to_dict(), "token": spec.token})


def decode_start(name: str, role: str, document: str) -> InstanceSpec:
    values = json.loads(document)
    return InstanceSpec(name, role, Config.from_dict(values["config"]), values["token"])


async def _main(spec: InstanceSpec, parent_pid: int) -> None:
    stop, force = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            force.set()
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)

    async def watch_parent() -> None:
        while os.getppid() == parent_pid:
            await asyncio.sleep(_PARENT_CHECK_S)
        logging.getLogger(__name__).warning("launcher process %d is gone; stopping", parent_pid)
        force.set()
        stop.set()

    def on_ready(ready: InstanceAddress) -> None:
        print(encode_ready(ready), flush=True)

    watcher = asyncio.create_task(watch_parent())
    try:
        await serve_instance(spec, on_ready, stop, force)
    finally:
        watcher.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.instance.main")
    parser.add_argument("--name", required=True)
    parser.add_argument("--role", required=True, choices=["prefill", "decode", "colocated"])
    parser.add_argument("--config-stdin", action="store_true",
                        help='read {"config": ..., "token": ...} as JSON from stdin (the only way in)')
    parser.add_argument("--parent-pid", type=int, default=None, help="stop when this process is gone")
    args = parser.parse_args(argv)
    if not args.config_stdin:
        parser.error("the config and the deployment's token come on stdin: pass --config-stdin")
    spec = decode_start(args.name, args.role, sys.stdin.read())
    logging.basicConfig(level=spec.config.server.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s [{args.name}] %(name)s: %(message)s")
    asyncio.run(_main(spec, args.parent_pid or os.getppid()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
