/* fwait: one 0x9B (fwait/wait) with no x87 exception pending, then carry on. */
#include "rt.h"

void guest_main(const struct hvm_start_info *si)
{
    (void)si;
    puts("fwait next\n");
    /* Only the wait byte itself: no other x87 instruction (the emulator may lack them). */
    __asm__ volatile(".byte 0x9b\n" ::: "memory");
    puts("fwait ok\n");
    reset();
}
