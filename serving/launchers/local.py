"""The local launcher: each instance a subprocess of the API server (`python -m serving.instance.main`),
its config and the deployment's token written to its stdin, its ready line read from its stdout."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future

from serving.instance.main import decode_ready, encode_start
from serving.instance.servicer import InstanceAddress, InstanceSpec
from serving.launchers.base import STOP_GRACE_S, LaunchedInstance

logger = logging.getLogger(__name__)


def process_tree(pid: int) -> list[int]:
    """pid's descendants (its engine process and anything that started), children first; Linux /proc.
    Read them before killing pid: once it is gone they belong to init and cannot be found from it."""
    found: list[int] = []
    queue = [pid]
    while queue:
        parent = queue.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except OSError:
                continue
            found += children
            queue += children
    return found


class _Process:
    """One instance subprocess; a thread reads its stdout for the ready line (and drains the rest).

    Its config and the deployment's token go down its stdin, which is then closed: any local user can
    read a process's command line (ps, /proc/<pid>/cmdline), so that holds only the name and role.
    """

    def __init__(self, spec: InstanceSpec) -> None:
        self.spec = spec
        command = [sys.executable, "-m", "serving.instance.main", "--name", spec.name,
                   "--role", spec.role, "--parent-pid", str(os.getpid()), "--config-stdin"]
        self.popen = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        # a child that died at once breaks the pipe; the stdout reader below reports its exit
        with contextlib.suppress(BrokenPipeError):
            self.popen.stdin.write(encode_start(spec))
        with contextlib.suppress(BrokenPipeError):
            self.popen.stdin.close()
        self.ready: Future = Future()
        threading.Thread(target=self._read_stdout, name=f"pdserve-{spec.name}-stdout", daemon=True).start()

    def _read_stdout(self) -> None:
        for line in self.popen.stdout:
            ready = decode_ready(line.strip())
            if ready is not None and not self.ready.done():
                self.ready.set_result(ready)
            elif ready is None:
                sys.stdout.write(line)
        if not self.ready.done():
            code = self.popen.wait()
            self.ready.set_exception(RuntimeError(
                f"instance {self.spec.name} exited with code {code} before serving (its log is above)"))

    def wait_ready(self, timeout_s: float) -> InstanceAddress:
        try:
            return self.ready.result(timeout=timeout_s)
        except TimeoutError:
            raise RuntimeError(f"instance {self.spec.name} did not start within {timeout_s:.0f}s "
                               "(--instance-start-timeout-s)") from None

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM (the instance drains), then SIGKILL after grace_s — to the instance and its engine
        process: a frozen instance (SIGSTOP, a hung host) froze its engine process too, and a stopped
        process cannot see that its parent is gone."""
        if self.popen.poll() is None:
            self.popen.terminate()
        try:
            self.popen.wait(grace_s)
        except subprocess.TimeoutExpired:
            family = process_tree(self.popen.pid)
            self.popen.kill()
            for pid in family:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.popen.wait()


class LocalLauncher:
    def __init__(self, start_timeout_s: float, stop_budget_s: float = STOP_GRACE_S) -> None:
        self.start_timeout_s = start_timeout_s
        self.stop_budget_s = stop_budget_s  # an instance stopped by shutdown() is not killed before that (base.py)
        self._processes: dict[str, _Process] = {}
        self._lock = threading.Lock()
        self._closed = False

    def start(self, specs: list[InstanceSpec]) -> list[LaunchedInstance]:
        processes = [self._spawn(spec) for spec in specs]
        try:
            return [self._launched(p) for p in processes]
        except BaseException:
            self.shutdown()
            raise

    async def restart(self, spec: InstanceSpec) -> LaunchedInstance:
        old = self._processes.get(spec.name)
        loop = asyncio.get_running_loop()
        if old is not None:
            await loop.run_in_executor(None, old.stop)
        process = self._spawn(spec)
        return await loop.run_in_executor(None, self._launched, process)

    def pid(self, name: str) -> int:
        return self._processes[name].popen.pid

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            processes = list(self._processes.values())
            self._processes.clear()
        for process in processes:
            if process.popen.poll() is None:
                process.popen.terminate()
        for process in processes:
            process.stop(self.stop_budget_s)

    def _spawn(self, spec: InstanceSpec) -> _Process:
        with self._lock:  # held while starting, so that shutdown() cannot miss the new process
            if self._closed:
                raise RuntimeError(f"not starting {spec.name}: the launcher is shut down")
            process = self._processes[spec.name] = _Process(spec)
        return process

    def _launched(self, process: _Process) -> LaunchedInstance:
        ready = process.wait_ready(self.start_timeout_s)
        return LaunchedInstance(process.spec, ready.address, ready.info)
