/*
 * cmos: read the MC146818 RTC through ports 0x70/0x71 (rtc_read_time in rt.c) and print
 * "rtc: YYYY-MM-DD HH:MM:SS".  If status A's UIP bit never clears
 * (no RTC emulated: every IN reads 0xff) it prints "rtc: UIP stuck".
 * With every=N on the command line it reads and prints the time again and again, N
 * busy-loop iterations apart, instead of resetting (what `ctl rtc` is tested with).
 */
#include "rt.h"

void guest_main(const struct hvm_start_info *si)
{
    struct rtc_time t;
    u32 every = cmdline_u32(si, "every", 0);

    do {
        if (rtc_read_time(&t)) {
            puts("rtc: UIP stuck\n");
            reset();
        }
        puts("rtc: ");
        rtc_print_time(&t);
        delay_loop(every);
    } while (every);
    reset();
}
