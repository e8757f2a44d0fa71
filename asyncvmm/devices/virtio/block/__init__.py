"""virtio-blk: the device model (device.py) and its disk images (image.py)."""
