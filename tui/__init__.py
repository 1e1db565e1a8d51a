"""The Textual TUI of the testbed (`testbed tui`): selection, live runs, attach mode.

A front end (docs/design.md, layers): it calls the library and renders its events, never the
kernel. `TestbedApp` is the app; `state` holds the pure models it renders.
"""

from __future__ import annotations

__all__ = ["TestbedApp"]


def __getattr__(name: str):  # lazy: `import tui` stays cheap
    if name == "TestbedApp":
        from tui.app import TestbedApp

        return TestbedApp
    raise AttributeError(name)
