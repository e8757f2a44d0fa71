/*
 * A 64 KiB firmware image for `-l bootrom,FILE` with `-s 31,lpc` (tests/integration/test_q35.py):
 * what Q35 firmware does to the chipset before anything else — OVMF's PlatformPei
 * (PlatformInitLib: the host bridge's device ID, PciExBarInitialization, the PMBASE/ACPI_EN
 * of PlatformMiscInitialization, AcpiTimerLib's delays on the PM timer) and SeaBIOS's
 * pciinit.c (mch_mem_addr_setup, mch_isa_bridge_setup, make_bios_writable's PAM writes).
 *
 * From the reset vector it enters 32-bit protected mode (flat) at once and prints, on
 * COM1, one line per step: a label and a 32-bit value in hex, for the test to judge.
 *   1. 00:00.0's ID through 0xCF8/0xCFC, and a read at 0xB0000000 (ECAM off at reset);
 *   2. PCIEXBAR = 0xB0000000 | 256 MiB | enable (high half first, as OVMF), then the IDs of
 *      00:00.0 and 00:1F.0 through ECAM; PCIEXBAR moved to 0xE0000000 | 128 MiB: the new
 *      base answers, the old one and bus 128 do not; back to 0xB0000000;
 *   3. the LPC's ID; the PM timer port (0x608) before ACPI_EN; PMBASE = 0x600, ACPI_EN;
 *      the PM timer's ticks over 50 ms of PIT channel 2 (mode 0, 59659 counts, polled on
 *      port 0x61 bit 5, as SeaBIOS and Linux calibrate); the ticks 1000 reads take (what a
 *      read costs, 1 tick = 279 ns); a 16-bit read of its upper half;
 *      SMI_EN (APMC_EN must read 1: no SMM);
 *   4. PAM0-6 written as SeaBIOS's make_bios_writable (two dwords) and read back;
 *      SMRAM; PIRQA_ROUT written and read back;
 *   5. waits for a key on COM1, then 0xCF9 <- 0x06 (the FADT's RESET_REG and RESET_VALUE):
 *      the VMM ends (--no-reboot).
 * No SSE; built like bootrom.S (linked at 0, flat; its last 64 KiB are also at 0xF0000).
 */
#include "rom.h"

	.code16
	.text
	.globl _start
_start:
	cli
	rom_enter_pm32 pm32

	.code32
#define CFG(dev, fn, reg) (0x80000000 | ((dev) << 11) | ((fn) << 8) | (reg))
#define ECAM 0xb0000000

/* print the label at ROM_ABS(msg), then %eax in hex */
.macro report msg
	movl $ROM_ABS(\msg), %esi
	call puts
	call puthex
.endm

pm32:
	movw $0x10, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movl $0x7000, %esp

	/* 1. the host bridge */
	movl $CFG(0, 0, 0x00), %ebx
	call cfg_rd32
	report msg_hb_id
	movl ECAM, %eax
	report msg_ecam_reset

	/* 2. PCIEXBAR (0x60): high dword, then base | LENGTH 0 (256 MiB) | PCIEXBAREN */
	movl $CFG(0, 0, 0x64), %ebx
	xorl %eax, %eax
	call cfg_wr32
	movl $CFG(0, 0, 0x60), %ebx
	movl $(ECAM | 1), %eax
	call cfg_wr32
	call cfg_rd32
	report msg_pciexbar
	movl ECAM, %eax
	report msg_ecam_hb
	movl (ECAM + (31 << 15)), %eax
	report msg_ecam_lpc
	movl $CFG(0, 0, 0x60), %ebx
	movl $(0xe0000000 | (1 << 1) | 1), %eax	/* 128 MiB at 0xE0000000 */
	call cfg_wr32
	movl 0xe0000000, %eax
	report msg_ecam_moved
	movl ECAM, %eax
	report msg_ecam_old
	movl (0xe0000000 + (128 << 20)), %eax
	report msg_ecam_bus128
	movl $CFG(0, 0, 0x60), %ebx
	movl $(ECAM | 1), %eax
	call cfg_wr32

	/* 3. the LPC at 00:1F.0, its PM block */
	movl $CFG(31, 0, 0x00), %ebx
	call cfg_rd32
	report msg_lpc_id
	movw $0x608, %dx
	inl %dx, %eax
	report msg_tmr_off
	movl $CFG(31, 0, 0x40), %ebx		/* PMBASE */
	movl $0x601, %eax
	call cfg_wr32
	movl $CFG(31, 0, 0x44), %ebx		/* ACPI_CNTL: ACPI_EN */
	movb $0x80, %al
	call cfg_wr8
	movl $CFG(31, 0, 0x40), %ebx
	call cfg_rd32
	report msg_pmbase

	inb $0x61, %al				/* PIT channel 2: gate on, speaker off */
	andb $0xfd, %al
	orb $0x01, %al
	outb %al, $0x61
	movb $0xb0, %al				/* channel 2, lobyte/hibyte, mode 0, binary */
	outb %al, $0x43
	movw $0x608, %dx
	inl %dx, %eax
	movl %eax, %edi				/* the PM timer at the start */
	movb $(59659 & 0xff), %al		/* 50 ms at 1.193182 MHz */
	outb %al, $0x42
	movb $(59659 >> 8), %al
	outb %al, $0x42
1:	inb $0x61, %al				/* OUT2 goes high when the count ends */
	testb $0x20, %al
	jz 1b
	movw $0x608, %dx
	inl %dx, %eax
	subl %edi, %eax
	report msg_tmr_ticks
	movw $0x608, %dx			/* what a read costs: 1000 of them, in PM ticks */
	inl %dx, %eax
	movl %eax, %edi
	movl $1000, %ecx
7:	inl %dx, %eax
	loop 7b
	subl %edi, %eax
	report msg_tmr_1000
	movw $0x60a, %dx			/* the upper half alone */
	xorl %eax, %eax
	inw %dx, %ax
	report msg_tmr_high
	movw $0x630, %dx			/* SMI_EN */
	inl %dx, %eax
	report msg_smi_en

	/* 4. PAM0-6 (0x90-0x96) as SeaBIOS's make_bios_writable: 0x30 then 0x33 x 6 */
	movl $CFG(0, 0, 0x90), %ebx
	movl $0x333333ff, %eax			/* PAM0's low nibble is reserved: reads 0 */
	call cfg_wr32
	movl $CFG(0, 0, 0x94), %ebx
	movl $0xff333333, %eax			/* 0x97 is not a PAM register */
	call cfg_wr32
	movl $CFG(0, 0, 0x90), %ebx
	call cfg_rd32
	report msg_pam_lo
	movl $CFG(0, 0, 0x94), %ebx
	call cfg_rd32
	report msg_pam_hi
	movl $CFG(0, 0, 0x9d), %ebx
	call cfg_rd8
	report msg_smram
	movl $CFG(31, 0, 0x60), %ebx		/* PIRQA_ROUT <- IRQ 11 */
	movb $0x0b, %al
	call cfg_wr8
	call cfg_rd8
	report msg_pirqa

	/* 5. a key on COM1 (the test snapshots the machine here), then the FADT's reset:
	 *    0x06 to 0xCF9 */
	movl $ROM_ABS(msg_wait), %esi
	call puts
	movw $0x3fd, %dx			/* LSR: data ready */
6:	inb %dx, %al
	testb $0x01, %al
	jz 6b
	movw $0x3f8, %dx
	inb %dx, %al
	movl $ROM_ABS(msg_reset), %esi
	call puts
	movb $0x06, %al
	movw $0xcf9, %dx
	outb %al, %dx
2:	hlt
	jmp 2b

/* config mechanism #1: CONFIG_ADDRESS <- %ebx & ~3; %dx <- the CONFIG_DATA port of %ebx's byte */
cfg_addr:
	pushl %eax
	movl %ebx, %eax
	andl $0xfffffffc, %eax
	movw $0xcf8, %dx
	outl %eax, %dx
	movl %ebx, %edx
	andl $3, %edx
	addl $0xcfc, %edx
	popl %eax
	ret
cfg_rd32:
	call cfg_addr
	inl %dx, %eax
	ret
cfg_wr32:
	call cfg_addr
	outl %eax, %dx
	ret
cfg_rd8:
	call cfg_addr
	xorl %eax, %eax
	inb %dx, %al
	ret
cfg_wr8:
	call cfg_addr
	outb %al, %dx
	ret

	rom_serial32

puthex:	/* %eax as 8 hex digits and a newline, to COM1 */
	pushl %ebx
	pushl %ecx
	pushl %edx
	movl %eax, %ebx
	movl $8, %ecx
	movw $0x3f8, %dx
5:	roll $4, %ebx
	movl %ebx, %eax
	andl $0xf, %eax
	movb ROM_ABS(hexdigits)(%eax), %al
	outb %al, %dx
	loop 5b
	movb $'\n', %al
	outb %al, %dx
	popl %edx
	popl %ecx
	popl %ebx
	ret

	rom_gdt

hexdigits:	.ascii "0123456789abcdef"
msg_hb_id:	.asciz "q35: host bridge id "
msg_ecam_reset:	.asciz "q35: ecam before pciexbar "
msg_pciexbar:	.asciz "q35: pciexbar "
msg_ecam_hb:	.asciz "q35: ecam 00:00.0 id "
msg_ecam_lpc:	.asciz "q35: ecam 00:1f.0 id "
msg_ecam_moved:	.asciz "q35: ecam at 0xe0000000 id "
msg_ecam_old:	.asciz "q35: ecam old base "
msg_ecam_bus128: .asciz "q35: ecam bus 128 of 128 "
msg_lpc_id:	.asciz "q35: lpc id "
msg_tmr_off:	.asciz "q35: pm timer before acpi_en "
msg_pmbase:	.asciz "q35: pmbase "
msg_tmr_ticks:	.asciz "q35: pm timer ticks in 50 ms of pit "
msg_tmr_1000:	.asciz "q35: pm timer ticks for 1000 reads "
msg_tmr_high:	.asciz "q35: pm timer high half "
msg_smi_en:	.asciz "q35: smi_en "
msg_pam_lo:	.asciz "q35: pam 0x90 "
msg_pam_hi:	.asciz "q35: pam 0x94 "
msg_smram:	.asciz "q35: smram "
msg_pirqa:	.asciz "q35: pirqa_rout "
msg_wait:	.asciz "q35: waiting for a key\n"
msg_reset:	.asciz "q35: reset through 0xcf9\n"

	.org 0xfff0
	.code16
reset_vector:
	ljmp $0xf000, $_start
	.org 0x10000
