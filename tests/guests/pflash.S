/*
 * A 64 KiB "UEFI" image for `-l bootrom,FILE,VARSFILE` with a 64 KiB variables file
 * (tests/integration/test_pflash.py): the variables' CFI flash is at 0xFFFE0000, right
 * below this image. It has a firmware volume signature at byte 40 so that it is taken as a
 * UEFI image, as OVMF_CODE.fd is. From the reset vector, in 32-bit protected mode, it does
 * to the flash what OVMF does (OvmfPkg/QemuFlashFvbServicesRuntimeDxe/QemuFlash.c) and
 * prints each result on COM1:
 *   1. OVMF's detection: at the first byte not 0x00/0x50/0x70, clear status (0x50) and
 *      read, read status (0x70) and read, program the byte with itself and check SR.4;
 *   2. the identifier (0x90) and the CFI query (0x98) "QRY";
 *   3. what an earlier boot left at 0x2000 (8 bytes);
 *   4. block erase of the block at 0x2000 (0x20, 0xD0), its status (read with the array's
 *      memory slot removed: the status, not the data), then read array: all 0xFF;
 *   5. program "ASYNCVMM" there byte by byte (0x10, byte), the status, read back;
 *   6. a command the flash does not know: both error bits; cleared with 0x50;
 *   7. the PC's reset control register: 0x06 to port 0xCF9 (or, if the variables hold
 *      'H' at 0x3000, a halt: the test kills the VMM then).
 * Built like bootrom.S: linked at 0, a flat binary, its last 64 KiB also at 0xF0000.
 */
#define VARS 0xfffe0000
#define BLOCK 0x2000

#include "rom.h"

	.code16
	.text
	.globl _start
_start:
	jmp start16
	.org 40
	.ascii "_FVH"			/* EFI_FIRMWARE_VOLUME_HEADER.Signature */
start16:
	cli
	xorw %ax, %ax
	movw %ax, %ds
	movw %ax, %ss
	movw $0x7000, %sp
	rom_enter_pm32 pm32

	.code32
pm32:
	movw $0x10, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movl $0x7000, %esp
	movl $ROM_ABS(msg_hello), %esi
	call puts

	/* 1. OVMF's detection */
	movl $VARS, %edi
1:	movb (%edi), %al
	cmpb $0x50, %al
	je 2f
	cmpb $0x70, %al
	je 2f
	testb %al, %al
	jnz 3f
2:	incl %edi
	cmpl $(VARS + 0x1000), %edi
	jb 1b
	movl $ROM_ABS(msg_noprobe), %esi
	call puts
	jmp reset
3:	movb (%edi), %bl		/* OriginalUint8 */
	movb $0x50, (%edi)		/* CLEAR_STATUS_CMD */
	movb (%edi), %al
	movl $ROM_ABS(msg_ram), %esi
	cmpb $0x50, %al
	je 4f
	movb $0x70, (%edi)		/* READ_STATUS_CMD */
	movb (%edi), %al
	movl $ROM_ABS(msg_rom), %esi
	cmpb %bl, %al
	je 4f
	movl $ROM_ABS(msg_ram), %esi
	cmpb $0x70, %al
	je 4f
	movl $ROM_ABS(msg_unknown), %esi
	testb %al, %al			/* CLEARED_ARRAY_STATUS */
	jnz 4f
	movb $0x10, (%edi)		/* WRITE_BYTE_CMD, the byte itself */
	movb %bl, (%edi)
	movb $0x70, (%edi)
	movb (%edi), %al
	movb $0xff, (%edi)		/* READ_ARRAY_CMD */
	movl $ROM_ABS(msg_flash), %esi
	testb $0x10, %al
	jz 4f
	movl $ROM_ABS(msg_flash_err), %esi
4:	call puts

	/* 2. identifier and CFI query */
	movb $0x90, VARS
	movl $ROM_ABS(msg_id), %esi
	call puts
	movb VARS, %al
	call hex8
	movb $0x98, VARS
	movl VARS + 0x10, %eax
	andl $0xffffff, %eax
	movb $0xff, VARS
	cmpl $0x595251, %eax		/* "QRY" */
	jne 5f
	movl $ROM_ABS(msg_qry), %esi
	call puts
5:	call newline

	/* 3. what is there */
	movl $ROM_ABS(msg_read), %esi
	call puts
	movl $(VARS + BLOCK), %esi
	movl $8, %ecx
6:	lodsb
	call putc
	loop 6b
	call newline

	/* 4. block erase */
	movb $0x20, VARS + BLOCK	/* BLOCK_ERASE_CMD */
	movb $0xd0, VARS + BLOCK	/* BLOCK_ERASE_CONFIRM_CMD */
	movl $ROM_ABS(msg_erase), %esi
	call puts
	movb VARS + BLOCK + 100, %al	/* status mode: the status, wherever read */
	call hex8
	call newline
	movb $0xff, VARS + BLOCK
	movl VARS + BLOCK, %eax
	andl VARS + BLOCK + 0xffc, %eax
	cmpl $0xffffffff, %eax
	jne 7f
	movl $ROM_ABS(msg_erased), %esi
	call puts
7:
	/* 5. program "ASYNCVMM" */
	movl $ROM_ABS(data), %esi
	movl $(VARS + BLOCK), %edi
	movl $8, %ecx
8:	movb $0x10, (%edi)
	lodsb
	movb %al, (%edi)
	incl %edi
	loop 8b
	movb $0x70, -1(%edi)
	movl $ROM_ABS(msg_program), %esi
	call puts
	movb VARS + BLOCK, %al
	call hex8
	call newline
	movb $0xff, VARS + BLOCK
	movl VARS + BLOCK, %eax
	cmpl ROM_ABS(data), %eax
	jne 9f
	movl VARS + BLOCK + 4, %eax
	cmpl ROM_ABS(data + 4), %eax
	jne 9f
	movl $ROM_ABS(msg_readback), %esi
	call puts
9:
	/* 6. a command it does not know */
	movb $0x42, VARS
	movl $ROM_ABS(msg_bad), %esi
	call puts
	movb VARS, %al
	call hex8
	movb $0x50, VARS
	movb $0x70, VARS
	movl $ROM_ABS(msg_cleared), %esi
	call puts
	movb VARS, %al
	call hex8
	call newline
	movb $0xff, VARS
	cmpb $0x48, VARS + 0x3000	/* 'H' there: halt instead (the test's SIGKILL) */
	jne reset
	movl $ROM_ABS(msg_halted), %esi
	call puts
	jmp 10f

reset:	/* 7. the reset control register */
	movl $ROM_ABS(msg_reset), %esi
	call puts
	movw $0xcf9, %dx
	movb $0x06, %al			/* SYS_RST | RST_CPU: a hard reset */
	outb %al, %dx
10:	hlt
	jmp 10b

	rom_serial32

newline:
	movb $10, %al			/* newline */
	jmp putc

hex8:	/* AL as two hex digits */
	pushl %eax
	shrb $4, %al
	call hexdigit
	popl %eax
	andb $0xf, %al
hexdigit:
	addb $48, %al			/* '0' */
	cmpb $57, %al			/* '9' */
	jbe putc
	addb $39, %al			/* 'a' - '0' - 10 */
	jmp putc

	rom_gdt

data:		.ascii "ASYNCVMM"
msg_hello:	.asciz "pflash: reset vector reached\n"
msg_noprobe:	.asciz "pflash: no probe location\n"
msg_ram:	.asciz "pflash: detected: RAM\n"
msg_rom:	.asciz "pflash: detected: ROM\n"
msg_unknown:	.asciz "pflash: detected: unknown\n"
msg_flash:	.asciz "pflash: detected: flash\n"
msg_flash_err:	.asciz "pflash: detected: flash, programming error\n"
msg_id:		.asciz "pflash: manufacturer "
msg_qry:	.asciz ", CFI QRY"
msg_read:	.asciz "pflash: read "
msg_erase:	.asciz "pflash: erase status "
msg_erased:	.asciz "pflash: block erased\n"
msg_program:	.asciz "pflash: program status "
msg_readback:	.asciz "pflash: programmed, reads back\n"
msg_bad:	.asciz "pflash: bad command status "
msg_cleared:	.asciz ", cleared "
msg_reset:	.asciz "pflash: reset through 0xcf9\n"
msg_halted:	.asciz "pflash: halted\n"

	.org 0xfff0
	.code16
reset_vector:
	ljmp $0xf000, $_start
	.org 0x10000
