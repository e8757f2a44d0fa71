/* echo: echo received bytes back (a-z -> A-Z); 'q' (not echoed) says bye and resets. */
#include "rt.h"

void guest_main(const struct hvm_start_info *si)
{
    (void)si;
    puts("echo ready\n");
    for (;;) {
        int c = getc();
        if (c == 'q') {
            puts("\nbye\n");
            reset();
        }
        if (c >= 'a' && c <= 'z')
            c -= 'a' - 'A';
        putc((char)c);
    }
}
