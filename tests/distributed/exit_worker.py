"""Run by test_teardown.py under torchrun: two-rank training, then the gloo threads still alive.

    python -m torch.distributed.run ... -m tests.distributed.exit_worker MODE[,MODE...] --set ...

MODE "cli": the `bigbatch train` command (bigbatch.cli.main), as a user runs it.
MODE "naive": a Trainer fitted and the process group destroyed while the trainer is
still referenced (the teardown before issue 19 item 4). The modes run one after the
other in this process, each as its own run (`run.name=MODE`), and after each this
rank prints one JSON line: {"rank": ..., "mode": ..., "code": ..., "gloo_threads": [...]},
the names of this process's gloo threads at that moment, where the interpreter would
begin to exit had the mode been the last. Before a later mode this rank joins a new
group under fresh store keys (`join_fresh_group`), which the Trainer then uses.
"""

from __future__ import annotations

import json
import os
import sys

_KEPT: list[object] = []  # the naive mode's trainer: still referenced when its gloo threads are read


def gloo_threads() -> list[str]:
    """The names of this process's threads that gloo started (pt_gloo_runloop, gloo_tcp_loop)."""
    names = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/comm") as f:
            names.append(f.read().strip())
    return sorted(n for n in names if "gloo" in n)


def run(mode: str, overrides: list[str]) -> int:
    """Train as MODE says; the exit code `bigbatch train` would give (0 for the naive teardown)."""
    if mode == "cli":
        from bigbatch.cli import main as cli

        return cli(["train", *[f"--set={o}" for o in overrides]])
    if mode != "naive":
        raise SystemExit(f"exit_worker: unknown mode {mode!r}: write cli or naive")
    import torch.distributed as dist

    from bigbatch.train import TrainConfig, Trainer

    trainer = Trainer(TrainConfig.load(overrides=overrides))
    trainer.fit()
    dist.destroy_process_group()
    _KEPT.append(trainer)
    return 0


def join_fresh_group(prefix: str) -> None:
    """Join a new gloo group whose rendezvous keys are under `prefix` in torchrun's store.

    A second `init_process_group` from the environment would name its group "0" again and
    read the first group's stale gloo addresses from the same store keys: a rank that got
    there first connected to the other's closed socket ("Connection closed by peer").
    """
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(seconds=120),
    )
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", store=dist.PrefixStore(prefix, store), rank=rank, world_size=world_size)


def main() -> None:
    """Train as each MODE says and print this rank's gloo threads after each."""
    modes, overrides = sys.argv[1].split(","), [a.removeprefix("--set=") for a in sys.argv[2:]]
    for index, mode in enumerate(modes):
        if index:
            join_fresh_group(f"exit-worker-{index}/")
        code = run(mode, [*overrides, f"run.name={mode}"])
        # One write of the line and its newline (print writes them apart): two ranks share the
        # pipe, and a write under PIPE_BUF is atomic, so their rows never run together.
        row = {"rank": int(os.environ["RANK"]), "mode": mode, "code": code, "gloo_threads": gloo_threads()}
        sys.stdout.write(json.dumps(row) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
