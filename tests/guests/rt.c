/* rt.c - runtime for asyncvmm test guests (see rt.h). */
#include "rt.h"

/* ---------------- reset / halt ---------------- */

void halt_forever(void)
{
    for (;;)
        __asm__ volatile("cli; hlt");
}

void reset(void)
{
    outb(0x64, 0xFE);       /* i8042: pulse the CPU reset line */
    halt_forever();
}

/* ---------------- serial ---------------- */

#define UART_THR 0   /* out */
#define UART_RBR 0   /* in */
#define UART_LSR 5
#define LSR_DR   0x01
#define LSR_THRE 0x20

void putc(char c)
{
    while (!(inb(COM1 + UART_LSR) & LSR_THRE))
        ;
    outb(COM1 + UART_THR, (u8)c);
}

void puts(const char *s)
{
    while (*s)
        putc(*s++);
}

static const char hexdig[] = "0123456789abcdef";

void print_hex(u32 v)
{
    char buf[8];
    int n = 0;
    do {
        buf[n++] = hexdig[v & 0xf];
        v >>= 4;
    } while (v);
    putc('0');
    putc('x');
    while (n)
        putc(buf[--n]);
}

void print_hex64(u64 v)
{
    u32 hi = (u32)(v >> 32);
    if (!hi) {
        print_hex((u32)v);
        return;
    }
    print_hex(hi);
    for (int sh = 28; sh >= 0; sh -= 4)
        putc(hexdig[((u32)v >> sh) & 0xf]);
}

void print_dec_pad(u32 v, u32 width)
{
    char buf[10];
    u32 n = 0;
    do {
        buf[n++] = (char)('0' + v % 10);   /* 32-bit division only */
        v /= 10;
    } while (v);
    while (width > n) {
        putc('0');
        width--;
    }
    while (n)
        putc(buf[--n]);
}

void print_dec(u32 v)
{
    print_dec_pad(v, 0);
}

int getc(void)
{
    while (!(inb(COM1 + UART_LSR) & LSR_DR))
        ;
    return inb(COM1 + UART_RBR);
}

/* ---------------- command line ---------------- */

const char *cmdline(const struct hvm_start_info *si)
{
    if (!si || si->magic != HVM_START_MAGIC || !si->cmdline_paddr ||
        (si->cmdline_paddr >> 32))
        return "";
    return (const char *)(u32)si->cmdline_paddr;
}

static int is_end(char c) { return c == 0 || c == ' ' || c == '\t' || c == '\n'; }

const char *cmdline_get(const struct hvm_start_info *si, const char *key)
{
    const char *p = cmdline(si);
    for (;;) {
        while (*p && is_end(*p))
            p++;
        if (!*p)
            return NULL;
        const char *k = key, *q = p;
        while (*k && *q == *k) {
            k++;
            q++;
        }
        if (!*k) {
            if (*q == '=')
                return q + 1;
            if (is_end(*q))
                return q;
        }
        while (!is_end(*p))
            p++;
    }
}

int parse_u32(const char *s, u32 *out)
{
    u32 v = 0;
    int digits = 0;
    if (!s)
        return -1;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        s += 2;
        for (; !is_end(*s); s++) {
            char c = *s;
            u32 d;
            if (c >= '0' && c <= '9') d = (u32)(c - '0');
            else if (c >= 'a' && c <= 'f') d = (u32)(c - 'a' + 10);
            else if (c >= 'A' && c <= 'F') d = (u32)(c - 'A' + 10);
            else return -1;
            v = (v << 4) | d;
            digits++;
        }
    } else {
        for (; !is_end(*s); s++) {
            if (*s < '0' || *s > '9')
                return -1;
            v = v * 10 + (u32)(*s - '0');
            digits++;
        }
    }
    if (!digits)
        return -1;
    *out = v;
    return 0;
}

u32 cmdline_u32(const struct hvm_start_info *si, const char *key, u32 dflt)
{
    u32 v;
    if (parse_u32(cmdline_get(si, key), &v) == 0)
        return v;
    return dflt;
}

/* ---------------- IDT ---------------- */

struct idt_entry {
    u16 off_lo;
    u16 sel;
    u8  zero;
    u8  type_attr;
    u16 off_hi;
} __attribute__((packed));

static struct idt_entry idt[256] __attribute__((aligned(8)));

void idt_set_gate(u8 vec, void (*handler)(void))
{
    u32 a = (u32)handler;
    idt[vec].off_lo = (u16)a;
    idt[vec].sel = 0x08;
    idt[vec].zero = 0;
    idt[vec].type_attr = 0x8E;      /* present, DPL0, 32-bit interrupt gate */
    idt[vec].off_hi = (u16)(a >> 16);
}

void lidt_raw(u32 base, u16 limit)
{
    struct {
        u16 limit;
        u32 base;
    } __attribute__((packed)) d = { limit, base };
    __asm__ volatile("lidt %0" : : "m"(d) : "memory");
}

void idt_load(void)
{
    lidt_raw((u32)idt, sizeof(idt) - 1);
}

/* ---------------- APICs / PIC ---------------- */

void lapic_enable(u8 spurious_vector)
{
    u32 svr = mmio_read32(LAPIC_BASE + LAPIC_SVR);
    svr = (svr & ~0xffu) | 0x100 | spurious_vector;
    mmio_write32(LAPIC_BASE + LAPIC_SVR, svr);
}

void lapic_eoi(void)
{
    mmio_write32(LAPIC_BASE + LAPIC_EOI, 0);
}

void ioapic_write(u32 reg, u32 val)
{
    mmio_write32(IOAPIC_BASE + 0x00, reg);
    mmio_write32(IOAPIC_BASE + 0x10, val);
}

u32 ioapic_read(u32 reg)
{
    mmio_write32(IOAPIC_BASE + 0x00, reg);
    return mmio_read32(IOAPIC_BASE + 0x10);
}

void pic_mask_all(void)
{
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
}

/* ---------------- libc bits ---------------- */

void *memset(void *d, int c, usize n)
{
    u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, usize n)
{
    u8 *p = d;
    const u8 *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

void *memmove(void *d, const void *s, usize n)
{
    u8 *p = d;
    const u8 *q = s;
    if (p < q) {
        while (n--)
            *p++ = *q++;
    } else {
        while (n--)
            p[n] = q[n];
    }
    return d;
}

int memcmp(const void *a, const void *b, usize n)
{
    const u8 *p = a, *q = b;
    for (; n; n--, p++, q++)
        if (*p != *q)
            return *p < *q ? -1 : 1;
    return 0;
}

usize strlen(const char *s)
{
    usize n = 0;
    while (s[n])
        n++;
    return n;
}

/* ---------------- MC146818 RTC through ports 0x70/0x71 ---------------- */

#define RTC_SEC     0x00
#define RTC_MIN     0x02
#define RTC_HOUR    0x04
#define RTC_DAY     0x07
#define RTC_MONTH   0x08
#define RTC_YEAR    0x09
#define RTC_STATUSA 0x0A
#define RTC_STATUSB 0x0B
#define RTC_CENTURY 0x32

struct rtc_raw { u8 sec, min, hour, day, month, year, century; };

static u8 cmos_reg(u8 reg)
{
    outb(0x70, reg);            /* bit 7 = 0: NMI stays enabled */
    return inb(0x71);
}

/* Bounded wait for status A UIP to clear; 0 on success. */
static int rtc_wait_uip(void)
{
    for (u32 i = 0; i < 2000; i++)
        if (!(cmos_reg(RTC_STATUSA) & 0x80))
            return 0;
    return -1;
}

static void rtc_snapshot(struct rtc_raw *r)
{
    r->sec = cmos_reg(RTC_SEC);
    r->min = cmos_reg(RTC_MIN);
    r->hour = cmos_reg(RTC_HOUR);
    r->day = cmos_reg(RTC_DAY);
    r->month = cmos_reg(RTC_MONTH);
    r->year = cmos_reg(RTC_YEAR);
    r->century = cmos_reg(RTC_CENTURY);
}

static u32 bcd(u8 v) { return (u32)(v >> 4) * 10 + (v & 0xf); }

/* Read the RTC into *t; -1 if UIP never clears (no RTC). */
int rtc_read_time(struct rtc_time *t)
{
    struct rtc_raw a, b;

    if (rtc_wait_uip())
        return -1;
    rtc_snapshot(&a);
    /* Re-read until two consecutive snapshots agree (an update may have hit). */
    for (int tries = 0; tries < 5; tries++) {
        if (rtc_wait_uip())
            break;
        rtc_snapshot(&b);
        if (!memcmp(&a, &b, sizeof(a)))
            break;
        a = b;
    }

    u8 sb = cmos_reg(RTC_STATUSB);
    int pm = a.hour & 0x80;
    u8 hraw = a.hour & 0x7f;
    u32 century;

    if (sb & 0x04) {            /* binary */
        t->sec = a.sec; t->min = a.min; t->hour = hraw; t->day = a.day;
        t->month = a.month; t->year = a.year; century = a.century;
    } else {
        t->sec = bcd(a.sec); t->min = bcd(a.min); t->hour = bcd(hraw);
        t->day = bcd(a.day); t->month = bcd(a.month); t->year = bcd(a.year);
        century = bcd(a.century);
    }
    if (!(sb & 0x02)) {         /* 12-hour mode: 12 AM = 0, 12 PM = 12 */
        if (t->hour == 12)
            t->hour = 0;
        if (pm)
            t->hour += 12;
    }
    if (century < 19 || century > 99)   /* register absent or garbage */
        century = 20;
    t->year += century * 100;
    return 0;
}

void rtc_print_time(const struct rtc_time *t)
{
    print_dec_pad(t->year, 4);
    putc('-');
    print_dec_pad(t->month, 2);
    putc('-');
    print_dec_pad(t->day, 2);
    putc(' ');
    print_dec_pad(t->hour, 2);
    putc(':');
    print_dec_pad(t->min, 2);
    putc(':');
    print_dec_pad(t->sec, 2);
    putc('\n');
}
