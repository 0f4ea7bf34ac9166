"""`bigbatch train` several times in one process, one run after another (a test helper).

    torchrun ... -m tests.train.several_runs RUNS.json

RUNS.json holds a list of argument lists; each is passed to `bigbatch.cli.main`, the
function `python -m bigbatch` calls, so each run is the command a user types: it joins
the process group from torchrun's environment at its start and leaves it at its end. The
multi-node tests start torchrun once for several runs this way, because each launcher's
start and rendezvous cost seconds.

A new store for each run after the first: torchrun's workers share the launcher's
key-value store, and a process group made again on it finds the last group's keys
(gloo's peer addresses among them), so a rank could read a stale address and connect to
a process group that is gone. Rank 0 picks a free port and hands it over through the
launcher's store; `bigbatch train` then meets there (MASTER_PORT, rank 0 hosting, as
outside torchrun).

Before each run a line `== run I ==` goes to stdout and stderr, after it
`== run I exit CODE ==` to stdout; the process exits with the largest code. A run
that torchrun stopped (its launcher ends the workers when another node's fails)
has no exit line.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import socket
import sys
from pathlib import Path

from bigbatch.cli import main

MARKER = "== run {} =="
EXIT = "== run {} exit {} =="


def _new_store(run: int, agent_port: int) -> None:
    """Point MASTER_PORT at a port rank 0 picked for `run`, rank 0 hosting the store there."""
    from torch.distributed import TCPStore

    agent = TCPStore(
        os.environ["MASTER_ADDR"], agent_port, is_master=False, timeout=datetime.timedelta(seconds=120)
    )
    key = f"several_runs/{run}/port"
    if int(os.environ["RANK"]) == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            agent.set(key, str(s.getsockname()[1]))
    os.environ["MASTER_PORT"] = agent.get(key).decode()
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"


def run_all(argvs: list[list[str]]) -> list[int]:
    """`main(argv)` for each, in order; their exit codes."""
    agent_port = int(os.environ.get("MASTER_PORT", "0"))
    codes = []
    for i, argv in enumerate(argvs):
        if i and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            _new_store(i, agent_port)
        for stream in (sys.stdout, sys.stderr):
            stream.write(MARKER.format(i) + "\n")
            stream.flush()
        codes.append(main(argv))
        print(EXIT.format(i, codes[-1]), flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    return codes


def split_output(text: str, runs: int) -> list[str]:
    """A process's stdout or stderr cut at the markers: each run's own lines ("" for a run never started)."""
    parts = []
    for i in range(runs):
        start = text.find(MARKER.format(i))
        end = text.find(MARKER.format(i + 1))
        parts.append("" if start < 0 else text[start : end if end >= 0 else len(text)])
    return parts


def exit_code(stdout: str, run: int) -> int | None:
    """Run `run`'s exit code from the process's stdout; None if it never ended (torchrun stopped it)."""
    found = re.search(re.escape(EXIT.format(run, "@")).replace("@", "(-?[0-9]+)"), stdout)
    return int(found.group(1)) if found else None


if __name__ == "__main__":
    raise SystemExit(max(run_all(json.loads(Path(sys.argv[1]).read_text(encoding="utf-8")))))
