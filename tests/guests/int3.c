/*
 * int3: #BP handler records the return EIP; execute a single 0xCC.
 * Prints "int3 handled, eip=0x..." (then "int3 eip ok" if EIP is the byte
 * after the 0xCC) or "int3 NOT handled".
 */
#include "rt.h"

static volatile u32 bp_eip;
static volatile u32 bp_count;

void bp_handler(struct rt_frame *f)
{
    bp_eip = f->eip;
    bp_count++;
}
RT_ISR(isr_bp, bp_handler);
RT_ISR_DECL(isr_bp);
extern const char int3_site[];

void guest_main(const struct hvm_start_info *si)
{
    (void)si;
    idt_set_gate(3, isr_bp);
    idt_load();
    __asm__ volatile(".globl int3_site\n"
                     "int3_site: .byte 0xcc\n" ::: "memory");
    if (bp_count) {
        puts("int3 handled, eip=");
        print_hex(bp_eip);
        putc('\n');
        if (bp_eip == (u32)int3_site + 1) {
            puts("int3 eip ok\n");
        } else {
            puts("int3 eip BAD, expected ");
            print_hex((u32)int3_site + 1);
            putc('\n');
        }
    } else {
        puts("int3 NOT handled\n");
    }
    reset();
}
