/*
 * head64.S - the protected-mode part of the bzimage64 test guest.
 *
 * Loaded anywhere (the VMM puts it at 1 MiB), so everything is position
 * independent: RIP-relative in 64-bit code, a call/pop base in the 32-bit stub.
 *
 *   offset 0x000  startup_32: the 32-bit boot protocol entry. Not supported;
 *                 it says so on COM1 and resets.
 *   offset 0x200  startup_64: the 64-bit boot protocol entry (boot.rst), entered
 *                 in long mode with identity paging and %rsi = struct boot_params.
 *
 * startup_64 assumes no stack (it runs on its own, inside the image), reports what
 * it finds in boot_params on COM1, checks CR0.PG and EFER.LMA and then resets.
 * It also checks the selectors and IF boot.rst prescribes, printing only failures.
 * Only instructions KVM's emulator handles are used (no SSE, popcnt, int3, iret).
 */
#include "bootparam.h"

#define STACK_SIZE 4096

/* %rsi = address of a NUL-terminated string (the macro clobbers %rsi) */
.macro PUTS label
    leaq    \label(%rip), %rsi
    call    puts
.endm

    .section .head, "ax"
    .globl startup_32
startup_32:
    .code32
    /*
     * 32-bit protocol: flat segments, paging off, %esi = boot_params, no stack.
     * Like Linux, borrow boot_params.scratch (4 bytes) as a one-slot stack to
     * learn where we run.
     */
    cli
    cld
    leal    (BP_scratch + 4)(%esi), %esp
    call    1f
1:  popl    %ebp
    leal    (msg_32bit - 1b)(%ebp), %ebx
2:  movb    (%ebx), %cl
    testb   %cl, %cl
    jz      4f
    movw    $COM1_LSR, %dx
3:  inb     %dx, %al
    testb   $LSR_THRE, %al
    jz      3b
    movw    $COM1_THR, %dx
    movb    %cl, %al
    outb    %al, %dx
    incl    %ebx
    jmp     2b
4:  movb    $I8042_PULSE_RESET, %al
    outb    %al, $I8042_COMMAND
5:  cli
    hlt
    jmp     5b

msg_32bit:
    .asciz  "bzimage64: 32-bit entry is not supported\n"

    /* ---- the 64-bit entry: startup_32 + 0x200 -------------------------------- */
    .org ENTRY64_OFFSET
    .code64
    .globl startup_64
startup_64:
    leaq    stack_top(%rip), %rsp       /* no flags touched before the pushfq */
    pushfq
    cli
    cld
    popq    %r13                        /* %r13 = RFLAGS at entry */
    movq    %rsi, %r15                  /* %r15 = boot_params for good */

    /* 1. boot_params: readable (the VMM identity-maps 4 GiB) and with "HdrS" */
    cmpq    $0x1000, %r15
    jb      bad_boot_params
    movq    $(1 << 32) - BP_SIZE, %rax
    cmpq    %rax, %r15
    ja      bad_boot_params
    cmpl    $HDRS_MAGIC, BP_hdr_header(%r15)
    jne     bad_boot_params

    /* 2. we are here. The rest of the entry state boot.rst asks for is checked
       quietly: a line appears only for what is wrong. */
    PUTS    msg_entry
    testl   $RFLAGS_IF, %r13d
    jz      1f
    PUTS    msg_bad_if
1:  movw    %cs, %ax
    movzwl  %ax, %eax
    cmpw    $BOOT_CS, %ax
    je      1f
    PUTS    msg_bad_cs
    call    put_hex
    call    newline
1:  movw    %ds, %ax
    movzwl  %ax, %eax
    cmpw    $BOOT_DS, %ax
    jne     2f
    movw    %es, %ax
    movzwl  %ax, %eax
    cmpw    $BOOT_DS, %ax
    jne     2f
    movw    %ss, %ax
    movzwl  %ax, %eax
    cmpw    $BOOT_DS, %ax
    je      3f
2:  PUTS    msg_bad_ds
    movw    %ds, %ax
    movzwl  %ax, %eax
    call    put_hex
    PUTS    msg_es
    movw    %es, %ax
    movzwl  %ax, %eax
    call    put_hex
    PUTS    msg_ss
    movw    %ss, %ax
    movzwl  %ax, %eax
    call    put_hex
    call    newline
3:

    /* 3. the command line: cmd_line_ptr | ext_cmd_line_ptr << 32 */
    PUTS    msg_cmdline
    movl    BP_hdr_cmd_line_ptr(%r15), %eax
    movl    BP_ext_cmd_line_ptr(%r15), %edx
    shlq    $32, %rdx
    orq     %rdx, %rax
    jz      1f
    movq    %rax, %rsi
    movl    BP_hdr_cmdline_size(%r15), %ecx   /* at most cmdline_size characters */
    call    putsn
    jmp     2f
1:  PUTS    msg_none
2:  call    newline

    /* 4. the e820 map: its entry count and the sum of the RAM (type 1) entries */
    PUTS    msg_e820
    movzbl  BP_e820_entries(%r15), %eax
    call    put_dec
    call    newline

    movzbl  BP_e820_entries(%r15), %ecx
    cmpl    $E820_MAX_ENTRIES_ZEROPAGE, %ecx
    jbe     1f
    movl    $E820_MAX_ENTRIES_ZEROPAGE, %ecx
1:  leaq    BP_e820_table(%r15), %rbx
    xorl    %eax, %eax                  /* %rax = bytes of RAM */
2:  testl   %ecx, %ecx
    jz      4f
    cmpl    $E820_TYPE_RAM, E820_ENTRY_type(%rbx)
    jne     3f
    addq    E820_ENTRY_size(%rbx), %rax
3:  addq    $E820_ENTRY_SIZE, %rbx
    decl    %ecx
    jmp     2b
4:  shrq    $10, %rax
    PUTS    msg_ram
    call    put_dec
    PUTS    msg_kib

    /* 5. the initrd: ramdisk_size (| ext_ramdisk_size << 32), its first 4 bytes */
    PUTS    msg_initrd_size
    movl    BP_hdr_ramdisk_size(%r15), %eax
    movl    BP_ext_ramdisk_size(%r15), %edx
    shlq    $32, %rdx
    orq     %rdx, %rax
    movq    %rax, %r14                  /* %r14 = initrd size */
    call    put_dec
    call    newline

    cmpq    $4, %r14
    jb      5f
    movl    BP_hdr_ramdisk_image(%r15), %eax
    movl    BP_ext_ramdisk_image(%r15), %edx
    shlq    $32, %rdx
    orq     %rdx, %rax
    jz      5f                          /* a size but no address: print nothing */
    movq    %rax, %rbx
    PUTS    msg_initrd_starts
    movl    $4, %ecx
1:  movzbl  (%rbx), %eax
    cmpb    $0x20, %al                  /* unprintable bytes show as '.' */
    jb      2f
    cmpb    $0x7E, %al
    jbe     3f
2:  movb    $'.', %al
3:  call    putc
    incq    %rbx
    decl    %ecx
    jnz     1b
    call    newline
5:

    /* 6. paging on (CR0.PG) and long mode active (EFER.LMA) */
    movq    %cr0, %rax
    testl   $CR0_PG, %eax
    jz      1f
    movl    $MSR_EFER, %ecx
    rdmsr
    testl   $EFER_LMA, %eax
    jz      1f
    PUTS    msg_paging_ok
    jmp     reset
1:  PUTS    msg_paging_bad
    jmp     reset

bad_boot_params:
    PUTS    msg_bad_boot_params
    /* fall through */

    /* 7. reset through the i8042, then halt for good */
reset:
    movb    $I8042_PULSE_RESET, %al
    outb    %al, $I8042_COMMAND
1:  cli
    hlt
    jmp     1b

/* ---- COM1 output; every routine preserves all registers but the flags ------- */

/* putc: %al = the byte. Waits for THRE, then writes THR. */
putc:
    pushq   %rdx
    pushq   %rax
    movw    $COM1_LSR, %dx
1:  inb     %dx, %al
    testb   $LSR_THRE, %al
    jz      1b
    popq    %rax
    movw    $COM1_THR, %dx
    outb    %al, %dx
    popq    %rdx
    ret

newline:
    pushq   %rax
    movb    $'\n', %al
    call    putc
    popq    %rax
    ret

/* puts: %rsi = NUL-terminated string */
puts:
    pushq   %rcx
    movl    $-1, %ecx
    call    putsn
    popq    %rcx
    ret

/* putsn: %rsi = string, %ecx = at most this many bytes (stops at a NUL) */
putsn:
    pushq   %rax
    pushq   %rcx
    pushq   %rsi
1:  testl   %ecx, %ecx
    jz      2f
    movzbl  (%rsi), %eax
    testb   %al, %al
    jz      2f
    call    putc
    incq    %rsi
    decl    %ecx
    jmp     1b
2:  popq    %rsi
    popq    %rcx
    popq    %rax
    ret

/* put_dec: %rax = unsigned 64-bit number, printed in decimal */
put_dec:
    pushq   %rax
    pushq   %rcx
    pushq   %rdx
    pushq   %rsi
    subq    $32, %rsp                   /* 20 digits + NUL fit */
    leaq    31(%rsp), %rsi
    movb    $0, (%rsi)
    movl    $10, %ecx
1:  xorl    %edx, %edx
    divq    %rcx
    addb    $'0', %dl
    decq    %rsi
    movb    %dl, (%rsi)
    testq   %rax, %rax
    jnz     1b
    call    puts
    addq    $32, %rsp
    popq    %rsi
    popq    %rdx
    popq    %rcx
    popq    %rax
    ret

/* put_hex: %rax = unsigned 64-bit number, printed as 0x<hex> without leading zeros */
put_hex:
    pushq   %rax
    pushq   %rcx
    pushq   %rdx
    pushq   %rsi
    subq    $32, %rsp                   /* "0x" + 16 digits + NUL fit */
    leaq    31(%rsp), %rsi
    movb    $0, (%rsi)
1:  movl    %eax, %edx
    andl    $0xF, %edx
    leaq    hex_digits(%rip), %rcx
    movb    (%rcx,%rdx), %dl
    decq    %rsi
    movb    %dl, (%rsi)
    shrq    $4, %rax
    jnz     1b
    subq    $2, %rsi
    movw    $0x7830, (%rsi)             /* "0x" */
    call    puts
    addq    $32, %rsp
    popq    %rsi
    popq    %rdx
    popq    %rcx
    popq    %rax
    ret

/* ---- read-only data --------------------------------------------------------- */
msg_entry:          .asciz "bzimage64: long mode entry ok\n"
msg_bad_boot_params: .asciz "bzimage64: bad boot_params\n"
msg_cmdline:        .asciz "bzimage64: cmdline="
msg_none:           .asciz "(none)"
msg_e820:           .asciz "bzimage64: e820 entries="
msg_ram:            .asciz "bzimage64: ram="
msg_kib:            .asciz " KiB\n"
msg_initrd_size:    .asciz "bzimage64: initrd size="
msg_initrd_starts:  .asciz "bzimage64: initrd starts "
msg_paging_ok:      .asciz "bzimage64: paging+lma ok\n"
msg_paging_bad:     .asciz "bzimage64: paging+lma BAD\n"
msg_bad_if:         .asciz "bzimage64: BAD: entered with interrupts enabled\n"
msg_bad_cs:         .asciz "bzimage64: BAD: cs is not __BOOT_CS (0x10): cs="
msg_bad_ds:         .asciz "bzimage64: BAD: ds/es/ss are not __BOOT_DS (0x18): ds="
msg_es:             .asciz " es="
msg_ss:             .asciz " ss="
hex_digits:         .ascii "0123456789abcdef"

/*
 * kernel_info (boot.rst, protocol 2.15): the setup header's kernel_info_offset
 * points here. No fixed fields beyond setup_type_max, no variable-size data.
 * setup_type_max 0: this guest reads no setup_data.
 */
    .balign 16
    .globl kernel_info
kernel_info:
    .long   LTOP_MAGIC                          /* "LToP" */
    .long   kernel_info_var_len_data - kernel_info   /* size */
    .long   kernel_info_end - kernel_info       /* size_total */
    .long   0                                   /* setup_type_max */
kernel_info_var_len_data:
kernel_info_end:

/* ---- the stack: part of the loaded image, so no memory beyond it is assumed -- */
    .section .stack, "aw"
    .balign 16
stack_bottom:
    .skip   STACK_SIZE
stack_top:
