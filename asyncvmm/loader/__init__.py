"""Booting a disk image as bhyveload, grub-bhyve and Xen's pygrub do: read its partition
table, find the boot menu on its filesystems, and hand the chosen entry's kernel, initrd
and command line to the ordinary Linux boot path (asyncvmm/boot/). No firmware runs.

    partitions.py   MBR (extended/logical) and GPT (CRCs checked)
    filesystems.py  files on a partition: blkid, e2fsprogs' debugfs, mtools; a host directory
    disks.py        the disks under GRUB's names (hd0,gpt2); filesystems only firmware reads
    grub_script.py  GRUB's script language: lexer and parser
    grub.py         grub.cfg as GRUB runs it (menuentry, submenu, search, load_env, ...)
    bls.py          Boot Loader Specification entries (/loader/entries/*.conf)
    syslinux.py     extlinux.conf / syslinux.cfg
    menu.py         the menu and GRUB's `default` rules
    boot.py         disks → menu → entry → kernel and initrd
    cli.py          `asyncvmm load`, and `asyncvmm run` without --kernel
"""
