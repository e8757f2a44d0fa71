"""The parts of a machine that own groups of devices: the legacy port devices, the PCI root."""
