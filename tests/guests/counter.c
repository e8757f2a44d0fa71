/* counter: "tick N" forever, delay= (default 20000) busy-loop iterations apart. */
#include "rt.h"

void guest_main(const struct hvm_start_info *si)
{
    u32 delay = cmdline_u32(si, "delay", 20000);

    for (u32 n = 0;; n++) {
        puts("tick ");
        print_dec(n);
        putc('\n');
        delay_loop(delay);
    }
}
