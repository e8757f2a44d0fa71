"""The control socket of a running VM (the analogue of bhyve's /dev/vmm/NAME) and `ctl`."""
