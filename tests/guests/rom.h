/*
 * What the test ROMs (bootrom.S, pflash.S, q35.S) share. Each is a 64 KiB image linked at
 * 0 and written out flat; the VMM maps it at the top of 4 GiB and its last 64 KiB also at
 * 0xF0000, where the code runs: ROM_ABS turns a label into that address.
 */
#define ROM_ABS(x) (0xf0000 + (x))

/* Real mode at the reset vector -> flat 32-bit protected mode at `label` (CS 0x08, data
 * selector 0x10, from rom_gdt). Clobbers %eax. */
.macro rom_enter_pm32 label
	lgdtl %cs:rom_gdtr
	movl %cr0, %eax
	orl $1, %eax
	movl %eax, %cr0
	ljmpl $0x08, $ROM_ABS(\label)
.endm

/* The flat GDT rom_enter_pm32 loads. */
.macro rom_gdt
	.balign 8
rom_gdt_table:
	.quad 0
	.quad 0x00cf9b000000ffff	/* 0x08: flat 32-bit code */
	.quad 0x00cf93000000ffff	/* 0x10: flat data */
rom_gdtr:
	.word rom_gdtr - rom_gdt_table - 1
	.long ROM_ABS(rom_gdt_table)
.endm

/* 32-bit output to COM1: puts (%esi, NUL-terminated; %esi ends past the NUL) and putc
 * (%al); both keep every other register. */
.macro rom_serial32
puts:
	pushl %eax
91:	lodsb
	testb %al, %al
	jz 92f
	call putc
	jmp 91b
92:	popl %eax
	ret
putc:
	pushl %edx
	movw $0x3f8, %dx
	outb %al, %dx
	popl %edx
	ret
.endm
