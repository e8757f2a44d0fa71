/*
 * bootparam.h - constants of the Linux/x86 boot protocol used by the bzimage64
 * test guest (offsets from Documentation/arch/x86/boot.rst and zero-page.rst).
 * Only plain #defines, so both .S files can include it.
 */
#ifndef BZ_BOOTPARAM_H
#define BZ_BOOTPARAM_H

/* --- image layout ---------------------------------------------------------- */
#define SETUP_SECTS         1           /* real-mode part = (1 + 1) * 512 bytes */
#define SECTOR_SIZE         512
#define SETUP_SIZE          ((SETUP_SECTS + 1) * SECTOR_SIZE)
#define ENTRY64_OFFSET      0x200       /* 64-bit entry = startup_32 + 0x200 */
#define LOAD_ADDRESS        0x100000    /* where a bzImage's protected-mode part loads */

/* --- setup header values --------------------------------------------------- */
#define BOOT_FLAG           0xAA55
#define HDRS_MAGIC          0x53726448  /* "HdrS" */
#define PROTOCOL_VERSION    0x020F      /* 2.15: kernel_info_offset is the last field */
#define LOADED_HIGH         (1 << 0)    /* loadflags */
#define XLF_KERNEL_64                (1 << 0)   /* xloadflags */
#define XLF_CAN_BE_LOADED_ABOVE_4G   (1 << 1)
#define VID_MODE_NORMAL     0xFFFF
#define START_SYS_SEG       0x1000      /* obsolete, but what every kernel says */
#define INITRD_ADDR_MAX     0x7FFFFFFF
#define KERNEL_ALIGNMENT    0x200000
#define MIN_ALIGNMENT_LG2   12          /* position independent: 4 KiB is plenty */
#define CMDLINE_SIZE        2047        /* COMMAND_LINE_SIZE - 1, as on x86 Linux */
#define PREF_ADDRESS        0x1000000   /* LOAD_PHYSICAL_ADDR of a default x86-64 kernel */
#define LTOP_MAGIC          0x506F544C  /* kernel_info header "LToP" */

/* --- struct boot_params offsets (the setup header sits at its image offsets) - */
#define BP_ext_ramdisk_image    0x0C0
#define BP_ext_ramdisk_size     0x0C4
#define BP_ext_cmd_line_ptr     0x0C8
#define BP_scratch              0x1E4
#define BP_e820_entries         0x1E8
#define BP_hdr                  0x1F1
#define BP_hdr_header           0x202
#define BP_hdr_ramdisk_image    0x218
#define BP_hdr_ramdisk_size     0x21C
#define BP_hdr_cmd_line_ptr     0x228
#define BP_hdr_cmdline_size     0x238
#define BP_e820_table           0x2D0
#define BP_SIZE                 0x1000

#define E820_MAX_ENTRIES_ZEROPAGE 128
#define E820_ENTRY_SIZE         20      /* packed {u64 addr; u64 size; u32 type} */
#define E820_ENTRY_size         8       /* offsets inside one entry */
#define E820_ENTRY_type         16
#define E820_TYPE_RAM           1

/* --- devices ---------------------------------------------------------------- */
#define COM1_THR            0x3F8
#define COM1_LSR            0x3FD
#define LSR_THRE            0x20
#define I8042_COMMAND       0x64
#define I8042_PULSE_RESET   0xFE

/* --- CPU state checked at the 64-bit entry ---------------------------------- */
#define BOOT_CS             0x10        /* __BOOT_CS */
#define BOOT_DS             0x18        /* __BOOT_DS */
#define RFLAGS_IF           (1 << 9)
#define CR0_PG              0x80000000
#define MSR_EFER            0xC0000080
#define EFER_LMA            (1 << 10)

#endif
