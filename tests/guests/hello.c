/* hello: greet, echo the command line, reset. */
#include "rt.h"

void guest_main(const struct hvm_start_info *si)
{
    puts("hello from the guest\n");
    puts("cmdline: ");
    puts(cmdline(si));
    putc('\n');
    reset();
}
