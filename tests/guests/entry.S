/*
 * entry.S - PVH entry for asyncvmm test guests.
 *
 * Entered in 32-bit protected mode, paging off, flat segments, interrupts
 * off, EBX = physical address of struct hvm_start_info.
 */
#define XEN_ELFNOTE_PHYS32_ENTRY 18
#define STACK_SIZE (16 * 1024)

    .section .note.Xen, "a", @note
    .p2align 2
    .long 4                         /* namesz: "Xen\0" */
    .long 4                         /* descsz */
    .long XEN_ELFNOTE_PHYS32_ENTRY  /* type */
    .asciz "Xen"
    .long _start                    /* desc: 32-bit physical entry point */
    .p2align 2

    .section .text.entry, "ax"
    .code32
    .globl _start
    .type _start, @function
_start:
    cli
    cld
    movl %ebx, %esi                 /* keep start_info across the setup */
    lgdt gdt_desc
    ljmp $0x08, $1f
1:  movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    movl $stack_top, %esp
    xorl %ebp, %ebp

    /* zero .bss (the stack lives after __bss_end and is not cleared) */
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    shrl $2, %ecx
    xorl %eax, %eax
    rep stosl

    pushl %esi
    call guest_main
    addl $4, %esp
    call reset
2:  cli
    hlt
    jmp 2b
    .size _start, . - _start

    .section .rodata
    .p2align 3
gdt:
    .quad 0                         /* null */
    .quad 0x00cf9a000000ffff        /* 0x08: 32-bit code, base 0, limit 4G */
    .quad 0x00cf92000000ffff        /* 0x10: data, base 0, limit 4G */
gdt_end:
    .p2align 2
    .word 0                         /* align the base field */
gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt

    .section .stack, "aw", @nobits
    .p2align 4
    .skip STACK_SIZE
stack_top:

    .section .note.GNU-stack, "", @progbits
