"""Real `idia-engine` processes without paying Python's start-up for each one.

The crash and concurrency tests need the CLI in a process of its own: SIGKILL must hit a real process (no
`finally`, no atexit, no flush), and two queries or builds at once must be two processes with their own
locks and LMDB reader slots. Started with `python -m idia_engine.cli.app`, each such process spends seconds
importing torch, open_clip and faiss before it does anything, and these tests start dozens.

So the processes come from multiprocessing's fork server, which imports this module (and through it the
engine) once; each CLI run is a fork of that server: a fresh process with its own pid, environment, file
descriptors and exit status, killed by a real SIGKILL, whose imports are already done. The server itself
never runs the engine (no torch thread pool exists before a fork), so each child starts as clean as a new
interpreter, apart from modules already imported.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# What each child would otherwise import itself: the fork server loads these before its first fork. They are
# named by their installed names because the server does not get the tests' sys.path (Python 3.11's
# forkserver ignores it); this module itself is then imported cheaply by each child, with everything loaded.
PRELOAD = ["faiss", "torch", "open_clip", "idia_engine.cli.app", "idia_engine.engine.index.build",
           "idia_engine.engine.index.encode", "idia_engine.engine.query.run"]
import faiss  # noqa: F401
import idia_engine.cli.app  # noqa: F401
import idia_engine.engine.index.build  # noqa: F401
import idia_engine.engine.index.encode as index_encode
import idia_engine.engine.query.run  # noqa: F401
import open_clip  # noqa: F401
import torch


def _run_cli_in_child(argv: list[str], env: dict[str, str], stdout: str, stderr: str) -> None:
    """The child's whole life: the environment and output files of a subprocess, then the CLI's main()."""
    os.environ.clear()
    os.environ.update(env)
    # Settings the engine reads from the environment when imported (here: in the server, before this run's
    # environment existed) are read again, as a fresh interpreter would.
    index_encode.COMMIT_EVERY_S = float(os.environ.get("IDIA_COMMIT_EVERY_S", "20"))
    if os.environ.get("OMP_NUM_THREADS"):  # read by OpenMP when it loaded, in the server
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False)
    sys.argv = ["idia-engine", *argv]
    from idia_engine.cli.app import main

    try:
        code = main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - a crash is reported as a subprocess's would be: traceback, exit 1
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # like the end of an interpreter, without multiprocessing's own exit handlers


@dataclass
class CliChild:
    """A CLI process in flight: the subset of subprocess.Popen the tests use (pid, poll, kill, communicate)."""

    process: multiprocessing.Process
    argv: list[str]
    stdout_path: Path
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode  # -9 after SIGKILL, as subprocess says it

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        self.process.kill()

    def wait(self, timeout: float | None = 300) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(self.argv, timeout)
        return self.process.exitcode

    def communicate(self, timeout: float | None = 300) -> tuple[str, str]:
        """(stdout, stderr) once the process has ended; after `timeout` seconds it is killed, as a hung CLI
        must not hang the suite."""
        try:
            self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.join()
            raise
        return (self.stdout_path.read_text(encoding="utf-8", errors="replace"),
                self.stderr_path.read_text(encoding="utf-8", errors="replace"))

    def completed(self, timeout: float | None = 300) -> subprocess.CompletedProcess:
        out, err = self.communicate(timeout)
        return subprocess.CompletedProcess(self.argv, self.returncode, out, err)


class CliProcesses:
    """Starts `idia-engine ARGS` as forks of one server (see the module docstring). The environment of each is
    the test's, with the hub offline, plus `env`; `fault` sets IDIA_FAULT (engine/disk/faults.py)."""

    def __init__(self, scratch: Path):
        self._context = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(PRELOAD)
        self._scratch = Path(scratch)
        self._count = 0

    def start(self, *args, fault: str | None = None, env: dict[str, str] | None = None) -> CliChild:
        environment = {**os.environ, "HF_HUB_OFFLINE": "1", "IDIA_OFFLINE": "1", **(env or {})}
        environment.pop("IDIA_FAULT", None)
        if fault:
            environment["IDIA_FAULT"] = fault
        self._count += 1
        out = Path(tempfile.mkstemp(prefix=f"cli-{self._count}-", suffix=".out", dir=self._scratch)[1])
        err = out.with_suffix(".err")
        argv = [str(a) for a in args]
        # Not a daemon: daemons may not start processes, and query's --workers start decoding processes.
        process = self._context.Process(target=_run_cli_in_child, args=(argv, environment, str(out), str(err)))
        process.start()
        return CliChild(process, argv, out, err)

    def run(self, *args, fault: str | None = None, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        return self.start(*args, fault=fault, env=env).completed(timeout)

