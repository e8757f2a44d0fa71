/*
 * hello-pvh.S - a self-contained 32-bit PVH guest, independent of tests/guests.
 *
 * Prints "Hello from a PVH guest that is not from tests/" on COM1 (polling
 * the 16550's LSR THRE bit before each byte), then resets the machine through
 * the i8042 (outb 0xFE to port 0x64).  Uses no stack, no GDT of its own and
 * no memory writes: it relies only on the PVH entry state (32-bit protected
 * mode, flat segments, paging off).
 *
 * Build (GNU binutils only; the file has no C preprocessor directives):
 *   as --32 -o hello-pvh.o hello-pvh.S
 *   ld -m elf_i386 -Ttext-segment=0x100000 -z noseparate-code -z noexecstack \
 *      -e _start -o hello-pvh.elf hello-pvh.o
 * This gives one R+X PT_LOAD at 1 MiB (ELF header, the Xen note, code, message)
 * and a PT_NOTE; the entry point is wherever _start lands (the note says where).
 * Plain `-Ttext=0x100000` moves only .text: ld's default script would still
 * put the note (and the ELF headers) at its default base 0x08048000.
 * Run, e.g.:
 *   perf/build/rawkvm hello-pvh.elf
 */

        .set COM1,      0x3f8
        .set COM1_LSR,  COM1 + 5
        .set LSR_THRE,  0x20
        .set XEN_ELFNOTE_PHYS32_ENTRY, 18

/* ELF note telling a PVH loader where to enter: name "Xen", type 18, desc = entry. */
        .section .note.Xen, "a", @note
        .p2align 2
        .long   2f - 1f                 /* namesz */
        .long   4f - 3f                 /* descsz */
        .long   XEN_ELFNOTE_PHYS32_ENTRY
1:      .asciz  "Xen"
2:      .p2align 2
3:      .long   _start
4:      .p2align 2

        .text
        .code32
        .globl  _start
_start:
        cli
        cld
        movl    $message, %esi
next_char:
        movb    (%esi), %cl
        testb   %cl, %cl
        jz      done
        movw    $COM1_LSR, %dx
wait_thre:
        inb     %dx, %al
        testb   $LSR_THRE, %al
        jz      wait_thre
        movw    $COM1, %dx
        movb    %cl, %al
        outb    %al, %dx
        incl    %esi
        jmp     next_char
done:
        movb    $0xfe, %al
        outb    %al, $0x64              /* i8042: pulse the reset line */
halt:
        cli
        hlt
        jmp     halt

        .section .rodata
message:
        .asciz  "Hello from a PVH guest that is not from tests/\n"

        .section .note.GNU-stack, "", @progbits
