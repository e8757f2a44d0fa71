"""An ISA interrupt line that several devices may drive (COM1 and COM3 share IRQ 4).

On a PC an ISA line is one wire into the 8259 and the IOAPIC, both programmed edge-
triggered for it: the line's level is the OR of what its devices drive, and only the line
rising is an interrupt. A device that raises its output while another already holds the
line high makes no new edge; the guest's handler for a shared line (Linux's 8250 driver
with shared IRQs) therefore serves every port on the line until none has anything pending,
which lets the line fall, so the next request is a fresh edge.

    line = IsaLine(pulse)              # pulse(): one edge to the interrupt controller
    com1_irq = line.driver("com1")     # a device's output: com1_irq(True/False)

Pure: no fds, no KVM; `pulse` is what reaches the controller (an irqfd write).
"""

from __future__ import annotations

from typing import Callable


class IsaLine:
    """One edge-triggered ISA interrupt line, the OR of its drivers' outputs."""

    def __init__(self, pulse: Callable[[], None]):
        self._pulse = pulse
        self._outputs: dict[str, bool] = {}
        self.level = False  # the wire: any driver's output high
        self.edges = 0  # rising edges delivered

    def driver(self, name: str) -> Callable[[bool], None]:
        """A new device on the line; returns the function that sets its output."""
        if name in self._outputs:
            raise ValueError(f"{name} already drives this line")
        self._outputs[name] = False

        def set_output(level: bool) -> None:
            self._set(name, level)

        return set_output

    @property
    def drivers(self) -> tuple[str, ...]:
        return tuple(self._outputs)

    def _set(self, name: str, level: bool) -> None:
        self._outputs[name] = level
        line = level or any(self._outputs.values())
        if line and not self.level:
            self.edges += 1
            self.level = True
            self._pulse()
        self.level = line
