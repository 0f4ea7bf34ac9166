"""Run by test_teardown.py under torchrun: a two-rank `bigbatch train`, then the gloo threads still alive.

    python -m torch.distributed.run ... -m tests.distributed.exit_worker MODE --set ...

MODE "cli": the `bigbatch train` command (bigbatch.cli.main), as a user runs it.
MODE "naive": a Trainer fitted and the process group destroyed while the trainer is
still referenced (the teardown before issue 19 item 4). Each rank prints one JSON
line: {"rank": ..., "gloo_threads": [...]}, the names of this process's gloo threads
at the moment the interpreter would begin to exit.
"""

from __future__ import annotations

import json
import os
import sys


def gloo_threads() -> list[str]:
    """The names of this process's threads that gloo started (pt_gloo_runloop, gloo_tcp_loop)."""
    names = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/comm") as f:
            names.append(f.read().strip())
    return sorted(n for n in names if "gloo" in n)


def main() -> None:
    """Train as MODE says and print this rank's gloo threads."""
    mode, overrides = sys.argv[1], [a.removeprefix("--set=") for a in sys.argv[2:]]
    if mode == "cli":
        from bigbatch.cli import main as cli

        code = cli(["train", *[f"--set={o}" for o in overrides]])
    else:
        import torch.distributed as dist

        from bigbatch.train import TrainConfig, Trainer

        trainer = Trainer(TrainConfig.load(overrides=overrides))
        trainer.fit()
        dist.destroy_process_group()
        code = 0
    # One write of the line and its newline (print writes them apart): two ranks share the
    # pipe, and a write under PIPE_BUF is atomic, so their rows never run together.
    row = json.dumps({"rank": int(os.environ["RANK"]), "code": code, "gloo_threads": gloo_threads()})
    sys.stdout.write(row + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
