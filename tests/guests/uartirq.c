/*
 * uartirq: receive "ping" through COM1's receive-data interrupt, routed
 * IOAPIC pin 4 -> vector 0x24 -> LAPIC 0 (8259s masked).
 */
#include "rt.h"

#define UART_VECTOR 0x24
#define SPURIOUS_VECTOR 0xFF
#define PING (((u32)'p' << 24) | ((u32)'i' << 16) | ((u32)'n' << 8) | (u32)'g')

static volatile u32 irq_count;
static volatile u32 rx_count;
static volatile u32 last4;          /* last 4 bytes received, newest in the low byte */
static volatile u32 got_ping;       /* "ping" seen in the received stream */

void uart_irq(struct rt_frame *f)
{
    (void)f;
    (void)inb(COM1 + 2);            /* IIR */
    while (inb(COM1 + 5) & 0x01) {  /* LSR.DR */
        u8 b = inb(COM1 + 0);       /* RBR */
        last4 = (last4 << 8) | b;
        rx_count++;
        if (rx_count >= 4 && last4 == PING)
            got_ping = 1;
    }
    irq_count++;
    lapic_eoi();
}
RT_ISR(isr_uart, uart_irq);
RT_ISR_DECL(isr_uart);

void spurious_irq(struct rt_frame *f)
{
    (void)f;                        /* no EOI for the spurious vector */
}
RT_ISR(isr_spurious, spurious_irq);
RT_ISR_DECL(isr_spurious);

void guest_main(const struct hvm_start_info *si)
{
    (void)si;
    pic_mask_all();
    idt_set_gate(UART_VECTOR, isr_uart);
    idt_set_gate(SPURIOUS_VECTOR, isr_spurious);
    idt_load();
    lapic_enable(SPURIOUS_VECTOR);

    /* pin 4: vector 0x24, fixed, physical, active high, edge, unmasked, dest APIC 0 */
    ioapic_write(0x11 + 2 * 4, 0u << 24);
    ioapic_write(0x10 + 2 * 4, UART_VECTOR);

    outb(COM1 + 4, 0x0b);           /* MCR: DTR | RTS | OUT2 (OUT2 gates IRQ 4 on a PC) */
    outb(COM1 + 1, 0x01);           /* IER: ERBFI */
    puts("irq ready\n");

    for (;;) {
        cli();
        if (got_ping)
            break;
        sti_hlt();
    }
    cli();
    outb(COM1 + 1, 0x00);
    puts("irq got ping after ");
    print_dec(irq_count);
    puts(" interrupts\n");
    reset();
}
