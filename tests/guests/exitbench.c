/* exitbench: n= (default 100000) outb's to port= (default 0x3ff), for exit timing. */
#include "rt.h"

void guest_main(const struct hvm_start_info *si)
{
    u32 n = cmdline_u32(si, "n", 100000);
    u16 port = (u16)cmdline_u32(si, "port", 0x3ff);

    puts("exitbench start\n");
    for (u32 i = 0; i < n; i++)
        outb(port, (u8)i);
    puts("exitbench done\n");
    reset();
}
