/*
 * tinysh: a tiny line-oriented command interpreter on COM1, to be driven like
 * a shell (a stand-in for a Linux shell where guest user space cannot run).
 *
 * Prints "tinysh ready", then the prompt "# ", reads a line (printable bytes
 * echoed, 0x7f/0x08 erase, '\r' or '\n' ends it; a '\n' right after a '\r'
 * is ignored) and runs it:
 *   echo WORDS...  WORDS joined by single spaces
 *   date           RTC time "YYYY-MM-DD HH:MM:SS" (rtc_read_time in rt.c)
 *   add A B        decimal sum of two unsigned 32-bit numbers (no wrap-around)
 *   count N        1..N, one per line (N <= 100000)
 *   mem            "ram=N KiB": type-1 entries of the PVH memory map
 *   cmdline        the kernel command line
 *   exit           "bye", then reset
 * Anything else: "tinysh: CMD: not found".  Errors go to COM1 as "tinysh: ...".
 */
#include "rt.h"

#define LINE_MAX  256
#define ARGS_MAX  32
#define COUNT_MAX 100000u

/* ---------------- output helpers ---------------- */

/* Decimal u64 with 32-bit operations only (no libgcc __udivdi3). */
static void print_u64(u64 v)
{
    char buf[20];
    int n = 0;
    do {
        u32 hi = (u32)(v >> 32), lo = (u32)v, ten = 10, qlo, r;
        u32 qhi = hi / 10;
        r = hi % 10;
        /* (r:lo) / 10 with r < 10, so the quotient fits in 32 bits. */
        __asm__("divl %4" : "=a"(qlo), "=d"(r) : "a"(lo), "d"(r), "r"(ten));
        buf[n++] = (char)('0' + r);
        v = ((u64)qhi << 32) | qlo;
    } while (v);
    while (n)
        putc(buf[--n]);
}

static int streq(const char *a, const char *b)
{
    while (*a && *a == *b) {
        a++;
        b++;
    }
    return *a == *b;
}

static void err(const char *cmd, const char *msg)
{
    puts("tinysh: ");
    puts(cmd);
    puts(msg);
    putc('\n');
}

/* Unsigned decimal that fits in 32 bits; 0 on success. */
static int parse_dec(const char *s, u32 *out)
{
    u32 v = 0;
    if (!*s)
        return -1;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return -1;
        u32 d = (u32)(*s - '0');
        if (v > (0xffffffffu - d) / 10)
            return -1;
        v = v * 10 + d;
    }
    *out = v;
    return 0;
}

/* ---------------- commands ---------------- */

static void cmd_echo(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (i > 1)
            putc(' ');
        puts(argv[i]);
    }
    putc('\n');
}

static void cmd_date(void)
{
    struct rtc_time t;
    if (rtc_read_time(&t)) {
        err("date", ": RTC UIP stuck");
        return;
    }
    rtc_print_time(&t);
}

static void cmd_add(int argc, char **argv)
{
    u32 a, b;
    if (argc != 3 || parse_dec(argv[1], &a) || parse_dec(argv[2], &b)) {
        err("add", ": usage: add A B (unsigned decimal, < 2^32)");
        return;
    }
    print_u64((u64)a + b);
    putc('\n');
}

static void cmd_count(int argc, char **argv)
{
    u32 n;
    if (argc != 2 || parse_dec(argv[1], &n) || n > COUNT_MAX) {
        err("count", ": usage: count N (0..100000)");
        return;
    }
    /* Increment an ASCII number in place: no division per line. */
    char num[13];
    int start = 10;
    num[10] = '0';
    num[11] = '\n';
    num[12] = 0;
    for (u32 i = 0; i < n; i++) {
        for (int d = 10;; d--) {
            if (d < start) {
                num[--start] = '1';
                break;
            }
            if (num[d] != '9') {
                num[d]++;
                break;
            }
            num[d] = '0';
        }
        puts(num + start);
    }
}

struct memmap_entry { u64 addr, size; u32 type, reserved; };

static void cmd_mem(const struct hvm_start_info *si)
{
    if (!si || si->magic != HVM_START_MAGIC || si->version < 1 ||
        !si->memmap_paddr || (si->memmap_paddr >> 32) || !si->memmap_entries) {
        err("mem", ": no PVH memory map");
        return;
    }
    const struct memmap_entry *e = (const struct memmap_entry *)(u32)si->memmap_paddr;
    u64 total = 0;
    for (u32 i = 0; i < si->memmap_entries; i++)
        if (e[i].type == 1)
            total += e[i].size;
    puts("ram=");
    print_u64(total >> 10);
    puts(" KiB\n");
}

static void run(const struct hvm_start_info *si, char *line)
{
    char *argv[ARGS_MAX];
    int argc = 0;
    char *p = line;

    for (;;) {
        while (*p == ' ')
            p++;
        if (!*p)
            break;
        if (argc == ARGS_MAX) {
            err(argv[0], ": too many words");
            return;
        }
        argv[argc++] = p;
        while (*p && *p != ' ')
            p++;
        if (*p)
            *p++ = 0;
    }
    if (!argc)
        return;

    const char *c = argv[0];
    if (streq(c, "echo"))
        cmd_echo(argc, argv);
    else if (streq(c, "date"))
        cmd_date();
    else if (streq(c, "add"))
        cmd_add(argc, argv);
    else if (streq(c, "count"))
        cmd_count(argc, argv);
    else if (streq(c, "mem"))
        cmd_mem(si);
    else if (streq(c, "cmdline")) {
        puts(cmdline(si));
        putc('\n');
    } else if (streq(c, "exit")) {
        puts("bye\n");
        reset();
    } else
        err(c, ": not found");
}

/* ---------------- line input ---------------- */

/* Read one line into buf (NUL-terminated), echoing like a terminal. */
static void read_line(char *buf)
{
    static int last_cr;     /* swallow the '\n' of a "\r\n" pair */
    u32 len = 0;

    for (;;) {
        int c = getc();
        if (c == '\n' && last_cr) {
            last_cr = 0;
            continue;
        }
        last_cr = 0;
        if (c == '\r' || c == '\n') {
            last_cr = c == '\r';
            putc('\n');
            break;
        }
        if (c == 0x7f || c == 0x08) {
            if (len) {
                len--;
                puts("\b \b");
            }
            continue;
        }
        if (c == '\t')
            c = ' ';
        if (c < 0x20 || c > 0x7e || len >= LINE_MAX - 1)
            continue;       /* other control bytes, or the line is full */
        buf[len++] = (char)c;
        putc((char)c);
    }
    buf[len] = 0;
}

void guest_main(const struct hvm_start_info *si)
{
    static char line[LINE_MAX];

    puts("tinysh ready\n");
    for (;;) {
        puts("# ");
        read_line(line);
        run(si, line);
    }
}
