"""vhost-user: a virtio device whose back-end is another process on a Unix socket
(QEMU's docs/interop/vhost-user.rst). protocol.py speaks the messages, blk.py is the
virtio-blk front-end, qsd.py runs qemu-storage-daemon as the back-end for image formats
asyncvmm does not serve itself."""
