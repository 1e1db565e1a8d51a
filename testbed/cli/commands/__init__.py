"""CLI sub-commands: each module defines `register(app)`; `testbed.cli` imports them."""
