"""Multi-process launch: ``loratune train RECIPE --gpus N`` re-runs itself under torchrun.

Nothing home-made: the command becomes ``python -m torch.distributed.run --nproc_per_node N
-m loratune train ...`` (the same thing ``torchrun`` does), and transformers' Trainer picks up
the process group from the environment (NCCL on GPUs, gloo on CPUs). ``accelerate launch -m
loratune train ...`` and plain ``torchrun`` work the same way without ``--gpus``.
"""
from __future__ import annotations

import os
import subprocess
import sys


def torchrun_command(inv, nproc: int) -> list[str]:
    args = [a for a in ([inv.recipe] if inv.recipe else []) + inv.overrides + inv.paths]
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", f"--nproc_per_node={nproc}",
        "-m", "loratune", inv.verb, *args,
    ]


def relaunch(inv) -> int:
    nproc = int(inv.flags["gpus"])
    cmd = torchrun_command(inv, nproc)
    print("launching:", " ".join(cmd), flush=True)
    env = dict(os.environ)
    # A rank that dies makes torchrun stop the others and exit non-zero; say so in one line.
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        print(f"error: a training process failed (exit {rc}); fix the cause above, then rerun with --resume "
              "to continue from the last checkpoint", file=sys.stderr)
    return rc
