"""A stand-in agent for bench/startup.py --agents: import torch, then report ready."""

import sys
import time

import torch  # noqa: F401 - the import is what is measured

with open(sys.argv[1], "w") as f:
    f.write(f"{time.time()}\n")
