/*
 * comports: a COM port other than COM1 (port=, default COM2 0x2F8), polled or by
 * interrupt.
 *
 * Polled (no irq=): writes "hello on PORT" there, then reads a line from it (up to '\n')
 * and writes it back upper-cased as "got LINE"; COM1 says "comports: echoed N bytes".
 *
 * irq=N: the port shares ISA IRQ N with COM1 (COM3 and COM1 on 4, as on a PC). Both get
 * ERBFI; IOAPIC pin N -> vector 0x24, edge. The handler serves every port on the line
 * until none has an interrupt pending (as Linux's 8250 driver does for a shared line:
 * an edge-triggered line only rises again once all its ports are quiet). It waits until
 * "ping" has arrived on both ports, then prints "comports: ping on both after K
 * interrupts" on COM1.
 */
#include "rt.h"

#define RBR 0
#define THR 0
#define IER 1
#define IIR 2
#define MCR 4
#define LSR 5
#define LSR_DR 0x01
#define LSR_THRE 0x20
#define IIR_NONE 0x01
#define VECTOR 0x24
#define SPURIOUS_VECTOR 0xFF
#define PING (((u32)'p' << 24) | ((u32)'i' << 16) | ((u32)'n' << 8) | (u32)'g')

static u16 ports[2];
static volatile u32 last4[2];
static volatile u32 pinged[2];
static volatile u32 irq_count;

static void port_putc(u16 port, char c)
{
    while (!(inb(port + LSR) & LSR_THRE))
        ;
    outb(port + THR, (u8)c);
}

static void port_puts(u16 port, const char *s)
{
    while (*s)
        port_putc(port, *s++);
}

static int port_getc(u16 port)
{
    while (!(inb(port + LSR) & LSR_DR))
        ;
    return inb(port + RBR);
}

void line_irq(struct rt_frame *f)
{
    (void)f;
    irq_count++;
    for (int busy = 1; busy;) {      /* until a whole pass finds nothing pending */
        busy = 0;
        for (int i = 0; i < 2; i++) {
            if (inb(ports[i] + IIR) & IIR_NONE)
                continue;
            busy = 1;
            while (inb(ports[i] + LSR) & LSR_DR) {
                last4[i] = (last4[i] << 8) | inb(ports[i] + RBR);
                if (last4[i] == PING)
                    pinged[i] = 1;
            }
        }
    }
    lapic_eoi();
}
RT_ISR(isr_line, line_irq);
RT_ISR_DECL(isr_line);

void spurious_irq(struct rt_frame *f)
{
    (void)f;
}
RT_ISR(isr_spurious, spurious_irq);
RT_ISR_DECL(isr_spurious);

static void shared_irq(u32 irq)
{
    pic_mask_all();
    idt_set_gate(VECTOR, isr_line);
    idt_set_gate(SPURIOUS_VECTOR, isr_spurious);
    idt_load();
    lapic_enable(SPURIOUS_VECTOR);
    /* pin irq: vector, fixed, physical, active high, edge, unmasked, dest APIC 0 */
    ioapic_write(0x11 + 2 * irq, 0u << 24);
    ioapic_write(0x10 + 2 * irq, VECTOR);
    for (int i = 0; i < 2; i++) {
        outb(ports[i] + MCR, 0x0b);  /* DTR | RTS | OUT2 (OUT2 gates the IRQ on a PC) */
        outb(ports[i] + IER, 0x01);  /* ERBFI */
    }
    puts("comports: irq ready\n");
    for (;;) {
        cli();
        if (pinged[0] && pinged[1])
            break;
        sti_hlt();
    }
    cli();
    outb(ports[0] + IER, 0);
    outb(ports[1] + IER, 0);
    puts("comports: ping on both after ");
    print_dec(irq_count);
    puts(" interrupts\n");
}

void guest_main(const struct hvm_start_info *si)
{
    u16 port = (u16)cmdline_u32(si, "port", 0x2F8);
    ports[0] = COM1;
    ports[1] = port;
    if (cmdline_get(si, "irq")) {
        shared_irq(cmdline_u32(si, "irq", 4));
        reset();
    }
    puts("comports: writing on ");
    print_hex(port);
    puts("\n");
    port_puts(port, "hello on ");
    port_putc(port, '0');
    port_putc(port, 'x');
    for (int shift = 8; shift >= 0; shift -= 4)
        port_putc(port, "0123456789abcdef"[(port >> shift) & 0xF]);
    port_puts(port, "\n");
    if (cmdline_get(si, "noread")) {
        puts("comports: done\n");
        reset();
    }
    char line[64];
    u32 n = 0;
    for (;;) {
        int c = port_getc(port);
        if (c == '\n' || c == '\r')
            break;
        if (n < sizeof(line) - 1)
            line[n++] = (char)(c >= 'a' && c <= 'z' ? c - ('a' - 'A') : c);
    }
    line[n] = 0;
    port_puts(port, "got ");
    port_puts(port, line);
    port_puts(port, "\n");
    puts("comports: echoed ");
    print_dec(n);
    puts(" bytes\n");
    reset();
}
