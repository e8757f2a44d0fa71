"""virtio 1.x devices: the PCI transport, the queue, and the devices behind them."""
