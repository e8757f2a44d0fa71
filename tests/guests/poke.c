/*
 * poke: a guest the control tests change from the host (ctl set, ctl nmi).
 *
 * Prints "tick N" forever, delay= (default 20000) busy-loop iterations apart, like
 * counter.  poked() sits at a symbol the tests look up in this ELF: a host that sets RIP
 * to it (and EAX to a value) makes the guest print "poked VALUE", then "poked tick N"
 * forever.  Vector 2 (NMI) prints "nmi N" where it interrupts.
 */
#include "rt.h"

static volatile u32 nmis;
static u32 delay;

void on_nmi(struct rt_frame *f);
void on_nmi(struct rt_frame *f)
{
    (void)f;
    nmis++;
    puts("nmi ");
    print_dec(nmis);
    putc('\n');
}
RT_ISR(nmi_stub, on_nmi);
RT_ISR_DECL(nmi_stub);

/* Entered by a jump the host makes (RIP set), never called: EAX is its argument. */
__attribute__((regparm(1), noreturn, used, noinline)) void poked(u32 value)
{
    puts("poked ");
    print_hex(value);
    putc('\n');
    for (u32 n = 0;; n++) {
        puts("poked tick ");
        print_dec(n);
        putc('\n');
        delay_loop(delay ? delay : 20000);
    }
}

void guest_main(const struct hvm_start_info *si)
{
    delay = cmdline_u32(si, "delay", 20000);
    idt_set_gate(2, nmi_stub);
    idt_load();
    puts("poke ready\n");
    for (u32 n = 0;; n++) {
        puts("tick ");
        print_dec(n);
        putc('\n');
        delay_loop(delay);
    }
}
