/*
 * smp: the BSP starts the APs with INIT + STARTUP + STARTUP through its LAPIC.
 * Each AP enters the real-mode trampoline (smp-tramp.S) copied to 0x8000,
 * switches to protected mode and calls ap_main(apic_id).
 */
#include "rt.h"

#define SMP_MAX_CPUS    16              /* smp-tramp.S: AP_MAX_ID + 1 */
#define SMP_TRAMP_BASE  0x8000u         /* page-aligned, below 1 MiB */
#define LAPIC_ID        0x020
#define LAPIC_ICR_LO    0x300
#define LAPIC_ICR_HI    0x310
#define ICR_INIT        0x00004500u     /* INIT, level assert */
#define ICR_STARTUP     0x00004600u     /* STARTUP, level assert; | vector */
#define ICR_BUSY        0x00001000u     /* delivery status */

extern const u8 smp_tramp_start[], smp_tramp_end[];

static volatile u32 ap_count;
static volatile u32 print_lock;

static void lock_acquire(volatile u32 *l)
{
    u32 v;
    for (;;) {
        v = 1;
        __asm__ volatile("lock xchgl %0, %1" : "+r"(v), "+m"(*l) : : "memory");
        if (!v)
            return;
        while (*l)
            __asm__ volatile("pause" ::: "memory");
    }
}

static void lock_release(volatile u32 *l)
{
    __asm__ volatile("" ::: "memory");
    *l = 0;
}

static u32 lapic_id(void)
{
    return mmio_read32(LAPIC_BASE + LAPIC_ID) >> 24;
}

void ap_main(u32 stack_id);
void ap_main(u32 stack_id)
{
    (void)stack_id;
    u32 id = lapic_id();                /* trust the LAPIC, not the caller */
    __asm__ volatile("lock incl %0" : "+m"(ap_count) : : "memory");
    lock_acquire(&print_lock);
    puts("ap ");
    print_dec(id);
    puts(" up\n");
    lock_release(&print_lock);
    halt_forever();
}

static void icr_send(u32 dest, u32 lo)
{
    mmio_write32(LAPIC_BASE + LAPIC_ICR_HI, dest << 24);
    mmio_write32(LAPIC_BASE + LAPIC_ICR_LO, lo);
    for (u32 i = 0; i < 100000 && (mmio_read32(LAPIC_BASE + LAPIC_ICR_LO) & ICR_BUSY); i++)
        ;
}

void guest_main(const struct hvm_start_info *si)
{
    u32 n = cmdline_u32(si, "cpus", 2);
    if (n < 1)
        n = 1;
    if (n > SMP_MAX_CPUS)
        n = SMP_MAX_CPUS;

    pic_mask_all();
    lapic_enable(0xFF);
    memcpy((void *)SMP_TRAMP_BASE, smp_tramp_start,
           (usize)(smp_tramp_end - smp_tramp_start));

    u32 self = lapic_id();
    for (u32 id = 0; id < n; id++) {
        if (id == self)
            continue;
        icr_send(id, ICR_INIT);
        delay_loop(10000);              /* MP spec: 10 ms */
        for (int k = 0; k < 2; k++) {
            icr_send(id, ICR_STARTUP | (SMP_TRAMP_BASE >> 12));
            delay_loop(1000);           /* MP spec: 200 us */
        }
    }

    /* Wait (bounded: about 6 s here, where this loop is emulated) for every AP to check in. */
    u32 want = n - 1;
    for (u32 i = 0; i < 2000000 && ap_count < want; i++)
        __asm__ volatile("pause" ::: "memory");

    lock_acquire(&print_lock);
    if (ap_count < want) {
        puts("smp: timeout, ");
        print_dec(ap_count);
        puts(" of ");
        print_dec(want);
        puts(" aps up\n");
    } else {
        puts("smp: ");
        print_dec(n);
        puts(" cpus up\n");
    }
    lock_release(&print_lock);
    if (cmdline_get(si, "stay"))       /* stay up, every CPU halted (a debugger looks at them) */
        halt_forever();
    reset();
}
