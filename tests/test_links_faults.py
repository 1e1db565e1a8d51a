"""`delay` and `loss` faults change a device's impairments live and undo them (fake cell)."""

from __future__ import annotations

import pytest

from testbed.composition.faults import FaultInjector, parse_fault
from testbed.errors import TopologyError
from testbed.model.impairments import LinkImpairment


class FakeCell:
    def __init__(self) -> None:
        self.impairments = {"dev01": LinkImpairment.symmetric(20, 4, 1), "dev02": LinkImpairment()}
        self.calls: list[dict] = []

    def device_ids(self) -> list[str]:
        return list(self.impairments)

    async def set_impairments(self, changes: dict) -> None:
        self.calls.append(changes)
        self.impairments.update(changes)


async def test_delay_and_loss_faults_change_one_field_and_undo():
    cell = FakeCell()
    inj = FaultInjector(cell, lambda *a, **kw: None)
    rec = await inj.inject("delay", "dev01", value=2.0)
    assert cell.impairments["dev01"] == LinkImpairment.symmetric(2, 2, 1)  # jitter clipped to the new delay
    await inj.restore(rec)
    assert cell.impairments["dev01"] == LinkImpairment.symmetric(20, 4, 1)
    rec = await inj.inject("loss", "dev02")
    assert cell.impairments["dev02"] == LinkImpairment.symmetric(0, 0, 5.0)
    await inj.close()
    assert cell.impairments["dev02"] == LinkImpairment()


def test_loss_fault_values():
    assert parse_fault("loss", "dev01", value=2.0).value == 2.0
    with pytest.raises(TopologyError, match="below 100"):
        parse_fault("loss", "dev01", value=100.0)
