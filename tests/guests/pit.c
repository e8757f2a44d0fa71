/*
 * pit: the i8254 PIT as Linux uses it, checked against itself.
 *
 * 1. Channel 2 through port 0x61 (pit_calibrate_tsc): gate high, mode 0 for 10 ms and
 *    for 50 ms, poll OUT2 (bit 5) and count TSC cycles; prints both counts.
 * 2. Channel 0 at 1000 Hz (mode 2) as IRQ0, through IOAPIC pin 0 -> vector 0x20 (8259s
 *    masked); counts interrupts over ten 50 ms channel-2 countdowns and prints the count.
 * Then resets. The host side judges the numbers (the VMM's PIT bounds IRQ0's rate).
 */
#include "rt.h"

#define PIT_CH0 0x40
#define PIT_CH2 0x42
#define PIT_MODE 0x43
#define PORT_B 0x61
#define PIT_HZ 1193182u
#define TIMER_VECTOR 0x20
#define SPURIOUS_VECTOR 0xFF

static volatile u32 ticks;

void timer_irq(struct rt_frame *f)
{
    (void)f;
    ticks++;
    lapic_eoi();
}
RT_ISR(isr_timer, timer_irq);
RT_ISR_DECL(isr_timer);

void spurious_irq(struct rt_frame *f)
{
    (void)f;
}
RT_ISR(isr_spurious, spurious_irq);
RT_ISR_DECL(isr_spurious);

/* Count channel 2 down from `count` in mode 0 and wait for OUT2; returns TSC cycles. */
static u64 ch2_wait(u32 count)
{
    outb(PORT_B, (inb(PORT_B) & ~0x02) | 0x01);   /* gate 2 high, speaker off */
    outb(PIT_MODE, 0xB0);                           /* channel 2, lo/hi, mode 0 */
    outb(PIT_CH2, count & 0xFF);
    u64 t0 = rdtsc();
    outb(PIT_CH2, count >> 8);
    while (!(inb(PORT_B) & 0x20))
        ;
    return rdtsc() - t0;
}

void guest_main(const struct hvm_start_info *si)
{
    (void)si;
    puts("pit ready\n");
    u64 c10 = ch2_wait(PIT_HZ / 100);
    u64 c50 = ch2_wait(PIT_HZ / 20);
    puts("pit ch2 10ms tsc=");
    print_dec((u32)(c10 >> 8));
    puts(" 50ms tsc=");
    print_dec((u32)(c50 >> 8));
    puts(" (x256)\n");

    pic_mask_all();
    idt_set_gate(TIMER_VECTOR, isr_timer);
    idt_set_gate(SPURIOUS_VECTOR, isr_spurious);
    idt_load();
    lapic_enable(SPURIOUS_VECTOR);
    /* pin 0: vector 0x20, fixed, physical, active high, edge, unmasked, dest APIC 0 */
    ioapic_write(0x11, 0u << 24);
    ioapic_write(0x10, TIMER_VECTOR);

    outb(PIT_MODE, 0x34);                           /* channel 0, lo/hi, mode 2 */
    outb(PIT_CH0, (PIT_HZ / 1000) & 0xFF);
    outb(PIT_CH0, (PIT_HZ / 1000) >> 8);
    sti();
    for (int i = 0; i < 10; i++)
        ch2_wait(PIT_HZ / 20);
    cli();
    outb(PIT_MODE, 0x30);                           /* channel 0 stopped (mode 0, no count) */
    puts("pit irq0 at 1000 Hz for 500 ms: ");
    print_dec(ticks);
    puts(" interrupts\n");
    reset();
}
