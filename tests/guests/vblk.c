/*
 * vblk: a tiny virtio-blk driver over modern virtio-pci, run by a real vCPU.
 *
 * Finds the first 1af4:1042 on bus 0 through ports 0xCF8/0xCFC, walks its capability
 * list, sizes BAR0 and moves it into the 32-bit window (this guest runs with paging off,
 * so it cannot reach the 64-bit BAR where the VMM put it), sets the device up
 * (reset .. DRIVER_OK, MSI-X vector 1 -> IDT vector 0x31 on LAPIC 0), reads the device
 * config, then does, on queue 0 of 8 entries:
 *   IN sector 0 (512 bytes)           -> prints "read: <first 16 bytes as text>"
 *   OUT sector 1 ("written by vblk")  -> prints "write: status N"
 *   FLUSH                             -> prints "flush: status N"
 *   IN sector <past the end>          -> prints "past end: status N" (1 = IOERR)
 * each waiting for its MSI-X interrupt (sti; hlt), and prints the interrupt count.
 * Command line: bar=0xC0000000 (where to put BAR0); stay=1 halts at the end instead of
 * resetting (so the host can read the VM's counters); irq=0 MSI-X (default), irq=1 INTx
 * (the pin's GSI from Interrupt Line, through the IOAPIC, level and active low, the ISR read
 * in the handler), irq=2 MSI (for -W). Prints "irq: msix|intx|msi".
 */
#include "rt.h"

#define VECTOR 0x31
#define SPURIOUS 0xFF
#define QSIZE 8

/* PCI (pci_regs.h) */
#define PCI_COMMAND 0x04
#define PCI_CAPABILITY_LIST 0x34
#define PCI_BAR0 0x10
#define PCI_CAP_ID_VNDR 0x09
#define PCI_CAP_ID_MSIX 0x11
#define PCI_CAP_ID_MSI 0x05
#define PCI_INTERRUPT_LINE 0x3C
/* virtio_pci.h */
#define CAP_COMMON 1
#define CAP_NOTIFY 2
#define CAP_DEVICE 4
#define CAP_ISR 3
#define C_DFSELECT 0
#define C_DF 4
#define C_GFSELECT 8
#define C_GF 12
#define C_MSIX 16
#define C_STATUS 20
#define C_QSELECT 22
#define C_QSIZE 24
#define C_QMSIX 26
#define C_QENABLE 28
#define C_QNOFF 30
#define C_QDESC 32
#define C_QAVAIL 40
#define C_QUSED 48
#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8

struct desc { u32 addr_lo, addr_hi, len; u16 flags, next; };
struct avail { u16 flags, idx, ring[QSIZE], used_event; };
struct used_elem { u32 id, len; };
struct used { u16 flags, idx; struct used_elem ring[QSIZE]; u16 avail_event; };

static struct desc desc[QSIZE] __attribute__((aligned(16)));
static struct avail avail __attribute__((aligned(4)));
static struct used used __attribute__((aligned(4)));
static struct { u32 type, ioprio; u32 sector_lo, sector_hi; } hdr __attribute__((aligned(16)));
static u8 data[512] __attribute__((aligned(512)));
static volatile u8 status;
static volatile u32 irqs;

static u32 cfg_addr(u32 slot, u32 reg) { return 0x80000000u | slot << 11 | (reg & 0xFC); }
static u32 cfg_read32(u32 slot, u32 reg) { outl(0xCF8, cfg_addr(slot, reg)); return inl(0xCFC); }
static u8 cfg_read8(u32 slot, u32 reg) { outl(0xCF8, cfg_addr(slot, reg)); return inb(0xCFC + (reg & 3)); }
static u16 cfg_read16(u32 slot, u32 reg) { outl(0xCF8, cfg_addr(slot, reg)); return inw(0xCFC + (reg & 2)); }
static void cfg_write32(u32 slot, u32 reg, u32 v) { outl(0xCF8, cfg_addr(slot, reg)); outl(0xCFC, v); }
static void cfg_write16(u32 slot, u32 reg, u16 v) { outl(0xCF8, cfg_addr(slot, reg)); outw(0xCFC + (reg & 2), v); }

static u32 common, notify, devcfg, notify_mult, msix_table, isr, msi_cap, msix_cap;
static volatile u32 isr_seen, isr_empty;

static void w8(u32 a, u8 v) { *(volatile u8 *)a = v; }
static void w16(u32 a, u16 v) { *(volatile u16 *)a = v; }
static void w32(u32 a, u32 v) { *(volatile u32 *)a = v; }
static u8 r8(u32 a) { return *(volatile u8 *)a; }
static u16 r16(u32 a) { return *(volatile u16 *)a; }
static u32 r32(u32 a) { return *(volatile u32 *)a; }

void vblk_irq(struct rt_frame *f)
{
    (void)f;
    irqs++;
    u8 v = *(volatile u8 *)isr; /* reading clears it (and, on INTx, is why the line drops) */
    isr_seen |= v;
    isr_empty += !v;
    lapic_eoi();
}
RT_ISR(isr_vblk, vblk_irq);
RT_ISR_DECL(isr_vblk);
void spurious(struct rt_frame *f) { (void)f; }
RT_ISR(isr_spurious, spurious);
RT_ISR_DECL(isr_spurious);

static u8 request(u32 type, u32 sector, u32 nqueued)
{
    hdr.type = type;
    hdr.ioprio = 0;
    hdr.sector_lo = sector;
    hdr.sector_hi = 0;
    status = 0xFF;
    desc[0] = (struct desc){(u32)&hdr, 0, 16, 1, 1};
    int n = 1;
    if (type != 4) { /* not FLUSH: a data buffer, device-writable for IN */
        desc[1] = (struct desc){(u32)data, 0, 512, (u16)(1 | (type == 0 ? 2 : 0)), 2};
        n = 2;
    } else {
        desc[0].next = 2;
    }
    desc[2] = (struct desc){(u32)&status, 0, 1, 2, 0};
    (void)n;
    avail.ring[avail.idx % QSIZE] = 0;
    barrier();
    avail.idx++;
    __asm__ volatile("lock; addl $0,(%%esp)" ::: "memory");
    u32 before = irqs;
    w16(notify, 0); /* queue 0's doorbell (its notify_off is 0) */
    for (;;) {
        cli();
        if (used.idx == nqueued && irqs != before)
            break;
        sti_hlt();
    }
    sti();
    return status;
}

void guest_main(const struct hvm_start_info *si)
{
    u32 bar = cmdline_u32(si, "bar", 0xC0000000u);
    u32 slot;
    for (slot = 1; slot < 32; slot++)
        if (cfg_read32(slot, 0) == 0x10421AF4u)
            break;
    if (slot == 32) {
        puts("vblk: no virtio-blk found\n");
        reset();
    }
    puts("pci 00:");
    print_dec_pad(slot, 2);
    puts(".0 1af4:1042\n");

    /* Size BAR0/1 (a 64-bit BAR) with decoding off, then move it to `bar`. */
    cfg_write16(slot, PCI_COMMAND, 0);
    cfg_write32(slot, PCI_BAR0, 0xFFFFFFFFu);
    cfg_write32(slot, PCI_BAR0 + 4, 0xFFFFFFFFu);
    u32 size = ~(cfg_read32(slot, PCI_BAR0) & ~0xFu) + 1;
    puts("bar0 size ");
    print_hex(size);
    puts("\n");
    cfg_write32(slot, PCI_BAR0, bar);
    cfg_write32(slot, PCI_BAR0 + 4, 0);
    cfg_write16(slot, PCI_COMMAND, 0x6); /* MEMORY | MASTER */

    for (u32 c = cfg_read8(slot, PCI_CAPABILITY_LIST); c; c = cfg_read8(slot, c + 1)) {
        u8 id = cfg_read8(slot, c);
        if (id == PCI_CAP_ID_VNDR) {
            u8 type = cfg_read8(slot, c + 3);
            u32 off = cfg_read32(slot, c + 8);
            if (type == CAP_COMMON)
                common = bar + off;
            else if (type == CAP_NOTIFY) {
                notify = bar + off;
                notify_mult = cfg_read32(slot, c + 16);
            } else if (type == CAP_DEVICE)
                devcfg = bar + off;
            else if (type == CAP_ISR)
                isr = bar + off;
        } else if (id == PCI_CAP_ID_MSIX) {
            msix_cap = c;
            msix_table = bar + (cfg_read32(slot, c + 4) & ~7u);
        } else if (id == PCI_CAP_ID_MSI) {
            msi_cap = c;
        }
    }
    u32 mode = cmdline_u32(si, "irq", 0);
    if (!common || !notify || !devcfg || !isr || (mode == 0 && !msix_table) || (mode == 2 && !msi_cap)) {
        puts("vblk: capabilities missing\n");
        reset();
    }

    pic_mask_all();
    idt_set_gate(VECTOR, isr_vblk);
    idt_set_gate(SPURIOUS, isr_spurious);
    idt_load();
    lapic_enable(SPURIOUS);
    u16 qvector = 0xFFFF;
    if (mode == 0) {
        cfg_write16(slot, msix_cap + 2, 0x8000 | cfg_read16(slot, msix_cap + 2)); /* MSI-X enable */
        /* MSI-X entry 1: the LAPIC's MSI window, APIC ID 0, vector VECTOR; unmasked */
        w32(msix_table + 16 + 0, 0xFEE00000u);
        w32(msix_table + 16 + 4, 0);
        w32(msix_table + 16 + 8, VECTOR);
        w32(msix_table + 16 + 12, 0);
        qvector = 1;
        puts("irq: msix\n");
    } else if (mode == 1) {
        u32 gsi = cfg_read8(slot, PCI_INTERRUPT_LINE);
        /* the pin's redirection entry: VECTOR, fixed, physical, active low, level, dest APIC 0 */
        ioapic_write(0x11 + 2 * gsi, 0u << 24);
        ioapic_write(0x10 + 2 * gsi, VECTOR | 1u << 13 | 1u << 15);
        puts("irq: intx gsi ");
        print_dec(gsi);
        puts("\n");
    } else {
        cfg_write32(slot, msi_cap + 4, 0xFEE00000u);
        cfg_write32(slot, msi_cap + 8, 0);
        cfg_write16(slot, msi_cap + 12, VECTOR);
        cfg_write16(slot, msi_cap + 2, 1 | cfg_read16(slot, msi_cap + 2)); /* MSI enable */
        puts("irq: msi\n");
    }

    w8(common + C_STATUS, 0);
    w8(common + C_STATUS, S_ACK);
    w8(common + C_STATUS, S_ACK | S_DRIVER);
    w32(common + C_DFSELECT, 1);
    u32 hi = r32(common + C_DF);
    w32(common + C_GFSELECT, 0);
    w32(common + C_GF, 0);
    w32(common + C_GFSELECT, 1);
    w32(common + C_GF, hi & 1); /* VERSION_1 only */
    w8(common + C_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
    if (!(r8(common + C_STATUS) & S_FEATURES_OK)) {
        puts("vblk: features refused\n");
        reset();
    }
    w16(common + C_MSIX, 0xFFFF);
    w16(common + C_QSELECT, 0);
    w16(common + C_QSIZE, QSIZE);
    w16(common + C_QMSIX, qvector);
    if (r16(common + C_QMSIX) != qvector) {
        puts("vblk: vector refused\n");
        reset();
    }
    notify += r16(common + C_QNOFF) * notify_mult;
    w32(common + C_QDESC, (u32)desc);
    w32(common + C_QDESC + 4, 0);
    w32(common + C_QAVAIL, (u32)&avail);
    w32(common + C_QAVAIL + 4, 0);
    w32(common + C_QUSED, (u32)&used);
    w32(common + C_QUSED + 4, 0);
    w16(common + C_QENABLE, 1);
    w8(common + C_STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);

    u32 capacity = r32(devcfg);
    puts("capacity ");
    print_dec(capacity);
    puts(" sectors\n");

    u8 st = request(0, 0, 1);
    puts("read: status ");
    print_dec(st);
    puts(" ");
    for (int i = 0; i < 16; i++)
        putc(data[i] >= 32 && data[i] < 127 ? (char)data[i] : '.');
    puts("\n");
    memset(data, 0, sizeof(data));
    memcpy(data, "written by vblk\n", 16);
    puts("write: status ");
    print_dec(request(1, 1, 2));
    puts("\n");
    puts("flush: status ");
    print_dec(request(4, 0, 3));
    puts("\n");
    puts("past end: status ");
    print_dec(request(0, capacity, 4));
    puts("\n");
    puts("interrupts ");
    print_dec(irqs);
    puts(" isr ");
    print_hex(isr_seen);
    puts(" empty ");
    print_dec(isr_empty);
    puts("\nvblk done\n");
    if (cmdline_u32(si, "stay", 0))
        for (;;) {
            cli();
            hlt();
        }
    reset();
}
