/*
 * sysrq: what Linux's 8250 driver does with a break (uart_handle_break): LSR shows BI
 * with a 0 byte in RBR, and the next byte is a SysRq key. Prints "break" for each break
 * and "sysrq K" for the key after one; other bytes are echoed as "byte K". The key 'q'
 * after a break resets.
 */
#include "rt.h"

#define LSR_DR 0x01
#define LSR_BI 0x10

void guest_main(const struct hvm_start_info *si)
{
    (void)si;
    int armed = 0;
    puts("sysrq ready\n");
    for (;;) {
        u8 lsr = inb(COM1 + 5);
        if (!(lsr & LSR_DR))
            continue;
        u8 c = inb(COM1 + 0);
        if (lsr & LSR_BI) {
            puts("break\n");
            armed = 1;
            continue;
        }
        puts(armed ? "sysrq " : "byte ");
        putc((char)c);
        putc('\n');
        if (armed && c == 'q')
            reset();
        armed = 0;
    }
}
