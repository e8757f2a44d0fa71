"""virtio-net on TAP devices: the device model (device.py) and the TAP (tap.py)."""
