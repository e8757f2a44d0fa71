/*
 * smp-tramp.S - real-mode AP trampoline for the smp guest.
 *
 * smp.c copies [smp_tramp_start, smp_tramp_end) to SMP_TRAMP_BASE (0x8000).  An AP
 * starts here after STARTUP with CS = SMP_TRAMP_BASE >> 4, IP = 0, so every
 * 16-bit data reference is an offset from smp_tramp_start.  It loads its own GDT
 * (code 0x08, data 0x10, like entry.S), sets CR0.PE and far-jumps to
 * smp_ap_entry32, which runs in place (linked at 1 MiB).
 */
#define SMP_TRAMP_BASE 0x8000
#define AP_STACK_SIZE 4096
#define AP_MAX_ID 15                    /* smp.c: SMP_MAX_CPUS - 1 */
#define T(sym) ((sym) - smp_tramp_start)

    .section .text, "ax"
    .code16
    .globl smp_tramp_start
    .p2align 4
smp_tramp_start:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl T(tr_gdt_desc)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x08, $smp_ap_entry32

    .p2align 3
tr_gdt:
    .quad 0                             /* null */
    .quad 0x00cf9a000000ffff            /* 0x08: 32-bit code, base 0, limit 4G */
    .quad 0x00cf92000000ffff            /* 0x10: data, base 0, limit 4G */
tr_gdt_end:
    .p2align 2
    .word 0
tr_gdt_desc:
    .word tr_gdt_end - tr_gdt - 1
    .long SMP_TRAMP_BASE + T(tr_gdt)    /* 32-bit linear base (lgdtl) */
    .globl smp_tramp_end
smp_tramp_end:

    .code32
    .globl smp_ap_entry32
    .type smp_ap_entry32, @function
smp_ap_entry32:
    movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    /* Per-AP stack chosen by the LAPIC ID (bits 31:24 of 0xFEE00020). */
    movl 0xfee00020, %eax
    shrl $24, %eax
    cmpl $AP_MAX_ID, %eax
    jbe 1f
2:  cli                                 /* ID out of range: no stack for it */
    hlt
    jmp 2b
1:  movl %eax, %ecx
    shll $12, %ecx                      /* * AP_STACK_SIZE */
    leal smp_ap_stacks + AP_STACK_SIZE(%ecx), %esp
    xorl %ebp, %ebp
    pushl %eax
    call ap_main
    jmp 2b
    .size smp_ap_entry32, . - smp_ap_entry32

    .section .bss
    .p2align 12
    .globl smp_ap_stacks
smp_ap_stacks:
    .skip AP_STACK_SIZE * (AP_MAX_ID + 1)

    .section .note.GNU-stack, "", @progbits
