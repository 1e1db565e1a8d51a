"""`testbed-agent RUN DEVICE`: a device's agent process, serving every registered method.

The agent itself (relay/agent.py) knows no method; this entry point hands it the
registry's table of task handlers. The agent template (composition/template.py) calls
`main` in each forked agent; compose and Swarm device containers run the console script.
"""

from __future__ import annotations

from testbed.methods import agent_handlers
from testbed.relay.agent import main as agent_main

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    agent_main(argv, agent_handlers())


if __name__ == "__main__":
    main()
