/*
 * acpi: find the ACPI tables as a kernel does and use them for power management.
 *
 * The RSDP comes from hvm_start_info (as Linux's PVH entry takes it) and, to check the
 * other way kernels find it, by scanning 0xE0000-0xFFFFF on 16-byte boundaries.  Every
 * table the XSDT lists, and the DSDT and FACS, is checked (signature, length,
 * checksum) and summarised; then, by `mode=`:
 *
 *   power  enable the power button event (PM1_EN.PWRBTN_EN), route the SCI through the
 *          IOAPIC as the MADT's override says, wait in hlt for it, clear PWRBTN_STS and
 *          enter S5 with the SLP_TYP the DSDT's \_S5 package gives (PM1a_CNT)
 *   deaf   enable the power button event too, but never power off: count the presses
 *   reset  write the FADT's RESET_VALUE to its RESET_REG
 *   cpus   start every other processor the MADT lists (INIT, STARTUP, STARTUP to its
 *          APIC ID; smp-tramp.S), each reports its LAPIC ID and CPUID's view of it;
 *          then the i8042 reset
 *
 * Every line starts with "acpi: "; a failed check prints "acpi: BAD ...".
 */
#include "rt.h"

#define SCI_VECTOR      0x29
#define SPURIOUS_VECTOR 0xFF
#define MAX_CPUS        16              /* smp-tramp.S: stacks for LAPIC IDs 0..15 */
#define SMP_TRAMP_BASE  0x8000u

/* ---- tables ---- */
struct sdt_header {
    char sig[4];
    u32 length;
    u8 revision, checksum;
    char oem_id[6], oem_table_id[8];
    u32 oem_revision, creator_id, creator_revision;
} __attribute__((packed));

struct rsdp {
    char sig[8];
    u8 checksum;
    char oem_id[6];
    u8 revision;
    u32 rsdt;
    u32 length;
    u64 xsdt;
    u8 ext_checksum, reserved[3];
} __attribute__((packed));

struct gas {
    u8 space, bit_width, bit_offset, access;
    u64 address;
} __attribute__((packed));

struct fadt {
    struct sdt_header h;
    u32 facs, dsdt;
    u8 reserved0, pm_profile;
    u16 sci_int;
    u32 smi_cmd;
    u8 acpi_enable, acpi_disable, s4bios_req, pstate_cnt;
    u32 pm1a_evt, pm1b_evt, pm1a_cnt, pm1b_cnt, pm2_cnt, pm_tmr, gpe0, gpe1;
    u8 pm1_evt_len, pm1_cnt_len, pm2_cnt_len, pm_tmr_len, gpe0_len, gpe1_len, gpe1_base, cst_cnt;
    u16 p_lvl2_lat, p_lvl3_lat, flush_size, flush_stride;
    u8 duty_offset, duty_width, day_alrm, mon_alrm, century;
    u16 iapc_boot_arch;
    u8 reserved1;
    u32 flags;
    struct gas reset_reg;
    u8 reset_value;
    u16 arm_boot_arch;
    u8 minor_revision;
    u64 x_facs, x_dsdt;
    struct gas x_pm1a_evt, x_pm1b_evt, x_pm1a_cnt, x_pm1b_cnt;
} __attribute__((packed));

#define GAS_SYSTEM_MEMORY 0
#define GAS_SYSTEM_IO     1
#define FADT_RESET_REG_SUP (1u << 10)

/* PM1 registers (ACPI 6.5, 4.8.3) */
#define PWRBTN_STS (1u << 8)
#define PWRBTN_EN  (1u << 8)
#define SCI_EN     (1u << 0)
#define SLP_TYP_SHIFT 10
#define SLP_TYP_MASK  (7u << SLP_TYP_SHIFT)
#define SLP_EN     (1u << 13)

/* MADT */
#define MADT_LAPIC 0
#define MADT_IOAPIC 1
#define MADT_OVERRIDE 2
#define MPS_POLARITY_MASK 0x3
#define MPS_POLARITY_LOW  0x3
#define MPS_TRIGGER_MASK  0xC
#define MPS_TRIGGER_LEVEL 0xC

/* IOAPIC redirection entry (low dword) */
#define IOAPIC_REDTBL(pin) (0x10 + 2 * (pin))
#define REDIR_ACTIVE_LOW (1u << 13)
#define REDIR_LEVEL      (1u << 15)

/* LAPIC */
#define LAPIC_ID        0x020
#define LAPIC_ICR_LO    0x300
#define LAPIC_ICR_HI    0x310
#define ICR_INIT        0x00004500u
#define ICR_STARTUP     0x00004600u
#define ICR_BUSY        0x00001000u

static int bad;
static const struct fadt *fadt;
static u32 pm1_sts, pm1_en, pm1_cnt;   /* ports */
static u32 slp_typ_s5 = 0xFFFFFFFFu;
static u32 sci_gsi, sci_flags;
static u32 ioapic_base, ioapic_gsi_base = 0xFFFFFFFFu;
static u8 lapic_ids[MAX_CPUS];
static u32 nlapics;

static volatile u32 presses;
static volatile u32 ap_count;
static volatile u32 print_lock;

static void say(const char *s) { puts("acpi: "); puts(s); }

static void fail(const char *what)
{
    bad++;
    puts("acpi: BAD ");
    puts(what);
    putc('\n');
}

static void put_sig(const char *s, u32 n)
{
    for (u32 i = 0; i < n; i++)
        putc(s[i] >= 32 && s[i] < 127 ? s[i] : '?');
}

static u8 sum(const void *p, u32 n)
{
    const u8 *b = p;
    u8 s = 0;
    while (n--)
        s += *b++;
    return s;
}

static const struct rsdp *valid_rsdp(u32 addr)
{
    const struct rsdp *r = (const struct rsdp *)addr;
    if (memcmp(r->sig, "RSD PTR ", 8) || sum(r, 20))
        return NULL;
    if (r->revision >= 2 && (r->length < sizeof(*r) || sum(r, r->length)))
        return NULL;
    return r;
}

static const struct rsdp *scan_rsdp(void)
{
    for (u32 a = 0xE0000; a < 0x100000; a += 16)
        if (valid_rsdp(a))
            return (const struct rsdp *)a;
    return NULL;
}

/* Check a table's header and checksum and print a line for it. */
static const struct sdt_header *table(u64 addr, const char *want)
{
    if (!addr || addr >> 32) {
        fail("table address");
        return NULL;
    }
    const struct sdt_header *h = (const struct sdt_header *)(u32)addr;
    puts("acpi: table ");
    put_sig(h->sig, 4);
    puts(" at ");
    print_hex((u32)addr);
    puts(" len ");
    print_dec(h->length);
    if (want && memcmp(h->sig, want, 4)) {
        puts(" wrong signature\n");
        fail("signature");
        return NULL;
    }
    if (h->length < sizeof(*h) || sum(h, h->length)) {
        puts(" checksum BAD\n");
        fail("checksum");
        return NULL;
    }
    puts(" ok\n");
    return h;
}

/* The first element of the \_S5 package: "_S5_" PackageOp PkgLength NumElements elem. */
static void find_s5(const struct sdt_header *dsdt)
{
    const u8 *p = (const u8 *)dsdt + sizeof(*dsdt), *end = (const u8 *)dsdt + dsdt->length;
    for (; p + 8 < end; p++) {
        if (memcmp(p, "_S5_", 4) || p[4] != 0x12)
            continue;
        const u8 *q = p + 5;
        q += 1 + (*q >> 6);             /* PkgLength: bits 7:6 count the bytes that follow */
        q++;                            /* NumElements */
        if (*q == 0x00 || *q == 0x01)   /* ZeroOp, OneOp */
            slp_typ_s5 = *q;
        else if (*q == 0x0A)            /* BytePrefix */
            slp_typ_s5 = q[1];
        break;
    }
    if (slp_typ_s5 == 0xFFFFFFFFu) {
        fail("no \\_S5 package in the DSDT");
        return;
    }
    say("s5 slp_typ ");
    print_dec(slp_typ_s5);
    putc('\n');
}

static void read_fadt(const struct fadt *f)
{
    fadt = f;
    u64 evt = f->x_pm1a_evt.address ? f->x_pm1a_evt.address : f->pm1a_evt;
    u64 cnt = f->x_pm1a_cnt.address ? f->x_pm1a_cnt.address : f->pm1a_cnt;
    pm1_sts = (u32)evt;
    pm1_en = (u32)evt + f->pm1_evt_len / 2;
    pm1_cnt = (u32)cnt;
    say("fadt sci ");
    print_dec(f->sci_int);
    puts(" pm1a_evt ");
    print_hex(pm1_sts);
    putc('/');
    print_dec(f->pm1_evt_len);
    puts(" pm1a_cnt ");
    print_hex(pm1_cnt);
    putc('/');
    print_dec(f->pm1_cnt_len);
    puts(" smi_cmd ");
    print_hex(f->smi_cmd);
    puts(" reset ");
    puts(f->reset_reg.space == GAS_SYSTEM_IO ? "io " : "mem ");
    print_hex((u32)f->reset_reg.address);
    puts(" value ");
    print_hex(f->reset_value);
    puts(" flags ");
    print_hex(f->flags);
    putc('\n');
    if (f->x_pm1a_evt.address && f->x_pm1a_evt.address != f->pm1a_evt)
        fail("X_PM1a_EVT_BLK differs from PM1a_EVT_BLK");
    if (f->x_dsdt && f->x_dsdt != f->dsdt)
        fail("X_DSDT differs from DSDT");
    const struct sdt_header *dsdt = table(f->x_dsdt ? f->x_dsdt : f->dsdt, "DSDT");
    if (dsdt)
        find_s5(dsdt);
    u64 facs_at = f->x_facs ? f->x_facs : f->facs;
    const char *facs = (const char *)(u32)facs_at;
    if (!facs_at || memcmp(facs, "FACS", 4) || (facs_at & 63))
        fail("FACS");
    else
        say("facs ok\n");
}

static void read_madt(const struct sdt_header *h)
{
    const u8 *p = (const u8 *)h + sizeof(*h) + 8, *end = (const u8 *)h + h->length;
    sci_gsi = fadt ? fadt->sci_int : 9;
    sci_flags = 0;
    for (; p + 2 <= end && p[1] >= 2; p += p[1]) {
        if (p[0] == MADT_LAPIC && (*(const u32 *)(p + 4) & 1)) {
            if (nlapics < MAX_CPUS)
                lapic_ids[nlapics] = p[3];
            nlapics++;
        } else if (p[0] == MADT_IOAPIC) {
            ioapic_base = *(const u32 *)(p + 4);
            ioapic_gsi_base = *(const u32 *)(p + 8);
        } else if (p[0] == MADT_OVERRIDE && fadt && p[3] == fadt->sci_int) {
            sci_gsi = *(const u32 *)(p + 4);
            sci_flags = *(const u16 *)(p + 8);
        }
    }
    say("madt lapics ");
    print_dec(nlapics);
    puts(" ids");
    for (u32 i = 0; i < nlapics && i < MAX_CPUS; i++) {
        putc(i ? ',' : ' ');
        print_dec(lapic_ids[i]);
    }
    puts(" ioapic ");
    print_hex(ioapic_base);
    puts(" gsi_base ");
    print_dec(ioapic_gsi_base);
    puts(" sci gsi ");
    print_dec(sci_gsi);
    puts(" flags ");
    print_hex(sci_flags);
    putc('\n');
}

static void read_mcfg(const struct sdt_header *h)
{
    const u8 *e = (const u8 *)h + sizeof(*h) + 8;
    say("mcfg ");
    print_hex64(*(const u64 *)e);
    puts(" segment ");
    print_dec(*(const u16 *)(e + 8));
    puts(" bus ");
    print_dec(e[10]);
    putc('-');
    print_dec(e[11]);
    putc('\n');
}

/* ---- the power button ---- */
void sci_irq(struct rt_frame *f)
{
    (void)f;
    u16 sts = inw(pm1_sts);
    if (sts & PWRBTN_STS) {
        outw(pm1_sts, PWRBTN_STS);      /* write 1 to clear: the SCI line drops */
        presses++;
    }
    lapic_eoi();
}
RT_ISR(isr_sci, sci_irq);
RT_ISR_DECL(isr_sci);

void spurious_irq(struct rt_frame *f) { (void)f; }
RT_ISR(isr_spurious, spurious_irq);
RT_ISR_DECL(isr_spurious);

static u32 lapic_id(void) { return mmio_read32(LAPIC_BASE + LAPIC_ID) >> 24; }

static void listen_for_power_button(void)
{
    pic_mask_all();
    idt_set_gate(SCI_VECTOR, isr_sci);
    idt_set_gate(SPURIOUS_VECTOR, isr_spurious);
    idt_load();
    lapic_enable(SPURIOUS_VECTOR);

    u32 pin = sci_gsi - ioapic_gsi_base;
    u32 low = SCI_VECTOR;
    /* The SCI is level, active low unless the override says otherwise (ACPI 6.5, 5.2.12.5). */
    u32 trigger = sci_flags & MPS_TRIGGER_MASK, polarity = sci_flags & MPS_POLARITY_MASK;
    if (trigger == 0 || trigger == MPS_TRIGGER_LEVEL)
        low |= REDIR_LEVEL;
    if (polarity == 0 || polarity == MPS_POLARITY_LOW)
        low |= REDIR_ACTIVE_LOW;
    ioapic_write(IOAPIC_REDTBL(pin) + 1, lapic_id() << 24);
    ioapic_write(IOAPIC_REDTBL(pin), low);

    if (!(inw(pm1_cnt) & SCI_EN))
        fail("SCI_EN is clear (and this guest has no SMI_CMD handshake)");
    outw(pm1_sts, PWRBTN_STS);          /* a stale press */
    outw(pm1_en, inw(pm1_en) | PWRBTN_EN);
    if (!(inw(pm1_en) & PWRBTN_EN))
        fail("PWRBTN_EN does not stick");
    say("sci on ioapic pin ");
    print_dec(pin);
    puts(low & REDIR_LEVEL ? " level" : " edge");
    puts(low & REDIR_ACTIVE_LOW ? " active-low\n" : " active-high\n");
}

static u32 wait_for_press(u32 seen)
{
    for (;;) {
        cli();
        if (presses != seen)
            break;
        sti_hlt();
    }
    return presses;
}

static NORETURN void enter_s5(void)
{
    u16 cnt = (u16)((inw(pm1_cnt) & ~(SLP_TYP_MASK | SLP_EN)) | (slp_typ_s5 << SLP_TYP_SHIFT));
    outw(pm1_cnt, cnt);                 /* as ACPICA does: SLP_TYP first, then with SLP_EN */
    outw(pm1_cnt, cnt | SLP_EN);
    delay_loop(100000);
    say("still running after S5\n");
    halt_forever();
}

static NORETURN void acpi_reset(void)
{
    if (!(fadt->flags & FADT_RESET_REG_SUP))
        fail("the FADT says RESET_REG is not supported");
    say("reset through RESET_REG\n");
    if (fadt->reset_reg.space == GAS_SYSTEM_IO)
        outb((u16)fadt->reset_reg.address, fadt->reset_value);
    else if (fadt->reset_reg.space == GAS_SYSTEM_MEMORY)
        *(volatile u8 *)(u32)fadt->reset_reg.address = fadt->reset_value;
    delay_loop(100000);
    say("still running after reset\n");
    halt_forever();
}

/* ---- processors ---- */
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

static void lock_release(volatile u32 *l) { __asm__ volatile("" ::: "memory"); *l = 0; }

static void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

/* "acpi: cpu apic A leaf1 X/N leafb S:T C:L x2apic I ext E" */
static void report_cpu(void)
{
    u32 a, b, c, d, max, ext;
    cpuid(0, 0, &max, &b, &c, &d);
    cpuid(0x80000000u, 0, &ext, &b, &c, &d);
    lock_acquire(&print_lock);
    say("cpu apic ");
    print_dec(lapic_id());
    cpuid(1, 0, &a, &b, &c, &d);
    puts(" leaf1 ");
    print_dec(b >> 24);
    putc('/');
    print_dec((b >> 16) & 0xFF);
    if (max >= 0xB) {
        cpuid(0xB, 0, &a, &b, &c, &d);
        puts(" leafb ");
        print_dec(a & 0x1F);
        putc(':');
        print_dec(b & 0xFFFF);
        cpuid(0xB, 1, &a, &b, &c, &d);
        putc(' ');
        print_dec(a & 0x1F);
        putc(':');
        print_dec(b & 0xFFFF);
        puts(" x2apic ");
        print_dec(d);
    }
    if (ext >= 0x8000001Eu) {
        cpuid(0x8000001Eu, 0, &a, &b, &c, &d);
        puts(" ext ");
        print_dec(a);
    }
    putc('\n');
    lock_release(&print_lock);
}

void ap_main(u32 stack_id);
void ap_main(u32 stack_id)
{
    (void)stack_id;
    report_cpu();
    __asm__ volatile("lock incl %0" : "+m"(ap_count) : : "memory");
    halt_forever();
}

extern const u8 smp_tramp_start[], smp_tramp_end[];

static void icr_send(u32 dest, u32 lo)
{
    mmio_write32(LAPIC_BASE + LAPIC_ICR_HI, dest << 24);
    mmio_write32(LAPIC_BASE + LAPIC_ICR_LO, lo);
    for (u32 i = 0; i < 100000 && (mmio_read32(LAPIC_BASE + LAPIC_ICR_LO) & ICR_BUSY); i++)
        ;
}

static NORETURN void start_cpus(void)
{
    pic_mask_all();
    lapic_enable(SPURIOUS_VECTOR);
    memcpy((void *)SMP_TRAMP_BASE, smp_tramp_start, (usize)(smp_tramp_end - smp_tramp_start));
    report_cpu();
    u32 self = lapic_id(), want = 0;
    for (u32 i = 0; i < nlapics && i < MAX_CPUS; i++) {
        if (lapic_ids[i] == self)
            continue;
        want++;
        icr_send(lapic_ids[i], ICR_INIT);
        delay_loop(10000);
        for (int k = 0; k < 2; k++) {
            icr_send(lapic_ids[i], ICR_STARTUP | (SMP_TRAMP_BASE >> 12));
            delay_loop(1000);
        }
    }
    for (u32 i = 0; i < 2000000 && ap_count < want; i++)
        __asm__ volatile("pause" ::: "memory");
    lock_acquire(&print_lock);
    say("");
    print_dec(ap_count + 1);
    puts(" of ");
    print_dec(want + 1);
    puts(" cpus up\n");
    lock_release(&print_lock);
    reset();
}

void guest_main(const struct hvm_start_info *si)
{
    const char *mode = cmdline_get(si, "mode");
    const struct rsdp *given = si->rsdp_paddr && !(si->rsdp_paddr >> 32) ? valid_rsdp((u32)si->rsdp_paddr) : NULL;
    const struct rsdp *found = scan_rsdp();
    if (!given && !found) {
        say("no rsdp\n");
        reset();
    }
    const struct rsdp *r = given ? given : found;
    say("rsdp ");
    print_hex((u32)r);
    puts(given ? " (start info)" : " (not in start info)");
    puts(" scan ");
    if (found)
        print_hex((u32)found);
    else
        puts("none");
    puts(" revision ");
    print_dec(r->revision);
    puts(" oem ");
    put_sig(r->oem_id, 6);
    putc('\n');
    if (given && found != given)
        fail("the scan finds another RSDP than start info gives");
    if (r->revision < 2 || !r->xsdt) {
        fail("no XSDT");
        reset();
    }

    const struct sdt_header *xsdt = table(r->xsdt, "XSDT");
    if (!xsdt)
        reset();
    u32 n = (xsdt->length - sizeof(*xsdt)) / 8;
    const u64 *entry = (const u64 *)((const u8 *)xsdt + sizeof(*xsdt));
    const struct sdt_header *madt = NULL, *mcfg = NULL;
    for (u32 i = 0; i < n; i++) {
        const struct sdt_header *h = table(entry[i], NULL);
        if (!h)
            continue;
        if (!memcmp(h->sig, "FACP", 4))
            read_fadt((const struct fadt *)h);
        else if (!memcmp(h->sig, "APIC", 4))
            madt = h;
        else if (!memcmp(h->sig, "MCFG", 4))
            mcfg = h;
    }
    if (!fadt || !madt) {
        fail("no FADT or MADT");
        reset();
    }
    read_madt(madt);
    if (mcfg)
        read_mcfg(mcfg);
    say(bad ? "tables BAD\n" : "tables ok\n");

    if (mode && !memcmp(mode, "reset", 5)) {
        acpi_reset();
    } else if (mode && !memcmp(mode, "cpus", 4)) {
        start_cpus();
    } else if (mode && (!memcmp(mode, "power", 5) || !memcmp(mode, "deaf", 4))) {
        int deaf = mode[0] == 'd';
        listen_for_power_button();
        say(deaf ? "waiting for the power button (deaf)\n" : "waiting for the power button\n");
        u32 seen = 0;
        for (;;) {
            seen = wait_for_press(seen);
            if (!deaf)
                break;
            say("power button pressed, ignored\n");
        }
        say("power button pressed, entering S5\n");
        enter_s5();
    }
    reset();
}
