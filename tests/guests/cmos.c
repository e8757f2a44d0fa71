/*
 * cmos: read the MC146818 RTC through ports 0x70/0x71 and print
 * "rtc: YYYY-MM-DD HH:MM:SS".  If status A's UIP bit never clears
 * (no RTC emulated: every IN reads 0xff) it prints "rtc: UIP stuck".
 */
#include "rt.h"

#define RTC_SEC     0x00
#define RTC_MIN     0x02
#define RTC_HOUR    0x04
#define RTC_DAY     0x07
#define RTC_MONTH   0x08
#define RTC_YEAR    0x09
#define RTC_STATUSA 0x0A
#define RTC_STATUSB 0x0B
#define RTC_CENTURY 0x32

static u8 rtc_read(u8 reg)
{
    outb(0x70, reg);            /* bit 7 = 0: NMI stays enabled */
    return inb(0x71);
}

/* Wait (bounded) for "update in progress" to clear; 0 on success. */
static int wait_uip(void)
{
    /* A real update keeps UIP set for < 2.3 ms; every poll is a VM exit. */
    for (u32 i = 0; i < 2000; i++)
        if (!(rtc_read(RTC_STATUSA) & 0x80))
            return 0;
    return -1;
}

struct rtc_raw { u8 sec, min, hour, day, month, year, century; };

static void read_all(struct rtc_raw *r)
{
    r->sec = rtc_read(RTC_SEC);
    r->min = rtc_read(RTC_MIN);
    r->hour = rtc_read(RTC_HOUR);
    r->day = rtc_read(RTC_DAY);
    r->month = rtc_read(RTC_MONTH);
    r->year = rtc_read(RTC_YEAR);
    r->century = rtc_read(RTC_CENTURY);
}

static u32 bcd(u8 v) { return (u32)(v >> 4) * 10 + (v & 0xf); }

void guest_main(const struct hvm_start_info *si)
{
    struct rtc_raw a, b;
    (void)si;

    if (wait_uip()) {
        puts("rtc: UIP stuck\n");
        reset();
    }
    read_all(&a);
    /* Re-read until two consecutive snapshots agree (an update may have hit). */
    for (int tries = 0; tries < 5; tries++) {
        if (wait_uip())
            break;
        read_all(&b);
        if (!memcmp(&a, &b, sizeof(a)))
            break;
        a = b;
    }

    u8 sb = rtc_read(RTC_STATUSB);
    int binary = sb & 0x04;
    int h24 = sb & 0x02;
    int pm = a.hour & 0x80;
    u8 hraw = a.hour & 0x7f;
    u32 sec, min, hour, day, month, year, century;

    if (binary) {
        sec = a.sec; min = a.min; hour = hraw; day = a.day;
        month = a.month; year = a.year; century = a.century;
    } else {
        sec = bcd(a.sec); min = bcd(a.min); hour = bcd(hraw); day = bcd(a.day);
        month = bcd(a.month); year = bcd(a.year); century = bcd(a.century);
    }
    if (!h24) {                 /* 12-hour mode: 12 AM = 0, 12 PM = 12 */
        if (hour == 12)
            hour = 0;
        if (pm)
            hour += 12;
    }
    if (century < 19 || century > 99)   /* register absent or garbage */
        century = 20;

    puts("rtc: ");
    print_dec_pad(century * 100 + year, 4);
    putc('-');
    print_dec_pad(month, 2);
    putc('-');
    print_dec_pad(day, 2);
    putc(' ');
    print_dec_pad(hour, 2);
    putc(':');
    print_dec_pad(min, 2);
    putc(':');
    print_dec_pad(sec, 2);
    putc('\n');
    reset();
}
