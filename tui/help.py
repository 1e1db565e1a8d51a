"""The help screen: screens, keys, attach mode. Esc or ? closes it."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static
from rich.markup import escape

from testbed.methods import methods
from testbed.model.names import SELECTORS

__all__ = ["HelpScreen", "help_text"]

HELP_TEXT_TEMPLATE = """\
[b]testbed TUI[/b] — device selection and live runs of multi-stage diffusion

[b]Keys[/b]
  s        select devices under T_max / E_max (chosen selector)
  r        run it in the emulation (netns backend, needs root);
           it writes {out}/<run>/ (testbed tui --out DIR changes it)
  k        kill the highlighted device during a run (recovery)
  c        cut / restore the highlighted device's link during a run
  1 2 3    Cell / Run / Image tab      tab  next control
  up/down  highlight a device          esc  back to the table
  ?        this help                   q    quit

[b]Controls[/b] (top line): T_max s, E_max J, device selector
({selectors}), method ({methods}),
seed. Enter selects again and goes back to the devices table.

[b]Cell[/b]: devices table (predicted T_j, E_j; sel = stage order), map of
the cell to scale (◉ server, O orin, X xavier; colour = precision;
numbered spokes = relay chain; ✗ offline), details of the highlighted device.
[b]Run[/b]: stage progress, latency per stage (Np = predicted), cumulative
energy vs E_max, event log.  [b]Image[/b]: generated image next to the
reference, with MS-SSIM.

[b]Attach[/b]: testbed tui \\[FILE] --attach RUN follows a run started from
the CLI through its MQTT events topic (read-only; s r k c are off).

[dim]Esc or ? closes this screen; q quits.[/dim]"""


def help_text(out_dir: str = "out") -> str:
    """The help, with the methods registered now (a plug-in registered after this module
    was imported is listed too) and where runs write."""
    return HELP_TEXT_TEMPLATE.format(selectors=" ".join(SELECTORS), methods=" ".join(m.name for m in methods()),
                                     out=escape(out_dir))


class HelpScreen(ModalScreen[None]):
    AUTO_FOCUS = "*"  # its text scrolls with the keys (the app sets no AUTO_FOCUS)
    BINDINGS = [
        Binding("escape", "dismiss", "Close"),
        Binding("question_mark", "dismiss", "Close", show=False),
    ]

    def __init__(self, out_dir: str = "out") -> None:
        super().__init__()
        self.out_dir = out_dir

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Static(help_text(self.out_dir), id="help-text")
