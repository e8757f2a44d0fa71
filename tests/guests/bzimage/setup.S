/*
 * setup.S - the real-mode part of the bzimage64 test guest: boot sector, setup
 * header at 0x1F1 and a stub, (SETUP_SECTS + 1) * 512 bytes in all.
 *
 * Nothing here is meant to run: the guest is only bootable through the 32/64-bit
 * boot protocols, where the loader reads the header and never enters real mode.
 * Both real-mode entry points (the boot sector at 0 and the setup entry the jump
 * at 0x200 leads to) just halt.
 *
 * Three header fields depend on the protected-mode part and come from the linker
 * script (bzimage.ld): bz_syssize, bz_init_size, bz_kernel_info_offset.
 */
#include "bootparam.h"

    .code16
    .section .setup, "ax"

    .globl _setup_start
_setup_start:
    /* "boot sector": nobody should boot this from a disk */
    cli
1:  hlt
    jmp 1b

    /* ---- the setup header (boot.rst "The Real-Mode Kernel Header") ---------- */
    .org 0x1F1
hdr:
setup_sects:        .byte   SETUP_SECTS
root_flags:         .word   0
syssize:            .long   bz_syssize              /* protected-mode part / 16, rounded up */
ram_size:           .word   0
vid_mode:           .word   VID_MODE_NORMAL
root_dev:           .word   0
boot_flag:          .word   BOOT_FLAG

    /* 0x200: jmp rel8 to the setup code; the offset byte (0x201) doubles as the
       header length: the header ends at 0x202 + that byte. */
jump:               .byte   0xEB, setup_entry - header
header:             .ascii  "HdrS"
version:            .word   PROTOCOL_VERSION
realmode_swtch:     .long   0
start_sys_seg:      .word   START_SYS_SEG
kernel_version:     .word   kernel_version_str - 0x200
type_of_loader:     .byte   0
loadflags:          .byte   LOADED_HIGH
setup_move_size:    .word   0x8000
code32_start:       .long   LOAD_ADDRESS
ramdisk_image:      .long   0
ramdisk_size:       .long   0
bootsect_kludge:    .long   0
heap_end_ptr:       .word   0
ext_loader_ver:     .byte   0
ext_loader_type:    .byte   0
cmd_line_ptr:       .long   0
initrd_addr_max:    .long   INITRD_ADDR_MAX
kernel_alignment:   .long   KERNEL_ALIGNMENT
relocatable_kernel: .byte   1
min_alignment:      .byte   MIN_ALIGNMENT_LG2
xloadflags:         .word   XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
cmdline_size:       .long   CMDLINE_SIZE
hardware_subarch:   .long   0
hardware_subarch_data: .quad 0
payload_offset:     .long   0                       /* no compressed payload */
payload_length:     .long   0
setup_data:         .quad   0
pref_address:       .quad   PREF_ADDRESS
init_size:          .long   bz_init_size
handover_offset:    .long   0                       /* no EFI handover entry */
kernel_info_offset: .long   bz_kernel_info_offset   /* from startup_32 */
    .globl setup_header_end
setup_header_end:

    /* ---- real-mode setup entry (seg + 0x20 : 0): unsupported, halt ---------- */
setup_entry:
    cli
1:  hlt
    jmp 1b

kernel_version_str:
    .asciz  "asyncvmm bzimage64 test guest"

    /* pad to the full setup area; .org fails the build if it already overflowed */
    .org SETUP_SIZE
