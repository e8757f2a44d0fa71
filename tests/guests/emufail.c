/* emufail: popcnt stops an emulating KVM with an emulation failure. */
#include "rt.h"

void guest_main(const struct hvm_start_info *si)
{
    (void)si;
    puts("emufail next\n");
    __asm__ volatile("xorl %%eax, %%eax\n"
                     ".byte 0xf3, 0x0f, 0xb8, 0xc0\n"   /* popcnt %eax, %eax */
                     ::: "eax", "cc");
    puts("popcnt ran\n");
    reset();
}
