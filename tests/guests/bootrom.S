/*
 * A 64 KiB firmware image for `-l bootrom,FILE` (tests/integration/test_bootrom.py).
 *
 * The CPU starts at the reset vector (0xFFFFFFF0, the last 16 bytes of the image) in real
 * mode; the image's last 64 KiB are also at 0xF0000, so `ljmp $0xF000, $start` lands in
 * its copy below 1 MiB. Then, printing each result on COM1:
 *   1. fw_cfg through the ports: select the signature (0x510), read 4 bytes (0x511);
 *   2. fw_cfg DMA: a descriptor at 0x1000 reading the file directory's count to 0x2000;
 *      then one whose buffer is outside guest RAM, which must come back with ERROR;
 *   3. in 32-bit protected mode, a write to the ROM at 0xFFFF0000: it must not change;
 *   4. the i8042 reset line: the VMM ends (--no-reboot).
 * Built with the system's gcc/as (.code16), linked at 0 and copied out as a flat binary.
 */
#include "rom.h"

	.code16
	.text
	.globl _start
_start:
	cli
	xorw %ax, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movw $0x7000, %sp

	movw $msg_hello, %si
	call puts

	/* 1. signature: selector 0, four data reads */
	movw $0x510, %dx
	xorw %ax, %ax
	outw %ax, %dx
	movw $0x511, %dx
	movw $4, %cx
	movw $0x3000, %di
1:	inb %dx, %al
	movb %al, (%di)
	incw %di
	loop 1b
	movl 0x3000, %eax
	cmpl $0x554d4551, %eax		/* "QEMU" */
	jne 2f
	movw $msg_sig, %si
	call puts
2:
	/* 2. DMA: control = SELECT | READ | FILE_DIR << 16, length 4, address 0x2000 (BE) */
	movl $0x0a001900, 0x1000	/* bytes 00 19 00 0a: BE 0x0019000a */
	movl $0x04000000, 0x1004	/* BE length 4 */
	movl $0, 0x1008			/* BE address, high half */
	movl $0x00200000, 0x100c	/* BE 0x2000 */
	movl $0xffffffff, 0x2000
	call dma_go
	movl 0x1000, %eax
	testl %eax, %eax		/* control 0: done, no error */
	jnz 3f
	cmpl $0xffffffff, 0x2000	/* the count was written */
	je 3f
	movw $msg_dma, %si
	call puts
3:
	/* a buffer at 0xF0000000: not RAM */
	movl $0x0a001900, 0x1000
	movl $0x00100000, 0x1004	/* BE length 0x1000 */
	movl $0, 0x1008
	movl $0x000000f0, 0x100c	/* BE 0xF0000000 */
	call dma_go
	movl 0x1000, %eax
	cmpl $0x01000000, %eax		/* BE control = ERROR (bit 0) */
	jne 4f
	movw $msg_dmaerr, %si
	call puts
4:
	/* 3. protected mode, write the ROM */
	rom_enter_pm32 pm32

dma_go:	/* the descriptor's address (0x1000): high half at 0x514, low at 0x518, big-endian */
	movw $0x514, %dx
	xorl %eax, %eax
	outl %eax, %dx
	movw $0x518, %dx
	movl $0x00100000, %eax		/* BE 0x1000 */
	outl %eax, %dx
	ret

puts:	/* DS:SI, NUL-terminated, to COM1 */
	movw $0x3f8, %dx
5:	lodsb %cs:(%si), %al
	testb %al, %al
	jz 6f
	outb %al, %dx
	jmp 5b
6:	ret

	.code32
pm32:
	movw $0x10, %ax
	movw %ax, %ds
	movw %ax, %es
	movl 0xffff0000, %ebx		/* what the ROM holds */
	movl %ebx, %eax
	notl %eax
	movl %eax, 0xffff0000		/* a write to flash */
	cmpl 0xffff0000, %ebx
	jne 7f
	movl $ROM_ABS(msg_rom), %esi
	movw $0x3f8, %dx
8:	lodsb
	testb %al, %al
	jz 7f
	outb %al, %dx
	jmp 8b
7:
	movw $0x64, %dx			/* 4. the i8042's reset line */
	movb $0xfe, %al
	outb %al, %dx
9:	hlt
	jmp 9b

	rom_gdt

msg_hello:	.asciz "bootrom: reset vector reached\n"
msg_sig:	.asciz "bootrom: fw_cfg signature QEMU\n"
msg_dma:	.asciz "bootrom: fw_cfg DMA read the directory\n"
msg_dmaerr:	.asciz "bootrom: fw_cfg DMA outside RAM: error\n"
msg_rom:	.asciz "bootrom: ROM write ignored\n"

	.org 0xfff0
	.code16
reset_vector:
	ljmp $0xf000, $_start
	.org 0x10000
