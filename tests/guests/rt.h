/*
 * rt.h - tiny freestanding runtime for asyncvmm test guests.
 *
 * Guests are 32-bit PVH images: entry.S sets up a stack and a flat GDT,
 * zeroes .bss and calls guest_main(start_info).  No libc, no SSE/x87.
 */
#ifndef RT_H
#define RT_H

typedef unsigned char      u8;
typedef unsigned short     u16;
typedef unsigned int       u32;
typedef unsigned long long u64;
typedef signed int         s32;
typedef unsigned int       usize;

#define NULL ((void *)0)
#define NORETURN __attribute__((noreturn))

/* Xen PVH start info (version 0/1 layout), as passed in EBX at entry. */
struct hvm_start_info {
    u32 magic;              /* 0x336ec578 */
    u32 version;
    u32 flags;
    u32 nr_modules;
    u64 modlist_paddr;
    u64 cmdline_paddr;
    u64 rsdp_paddr;
    u64 memmap_paddr;       /* version >= 1 */
    u32 memmap_entries;     /* version >= 1 */
    u32 reserved;
};
#define HVM_START_MAGIC 0x336ec578u

/* Implemented by each guest. */
void guest_main(const struct hvm_start_info *si);

/* ---- port I/O ---- */
static inline void outb(u16 port, u8 v)  { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8  inb(u16 port) { u8 v;  __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

/* ---- MMIO (paging is off: physical == linear) ---- */
static inline u32 mmio_read32(u32 addr) { return *(volatile u32 *)addr; }
static inline void mmio_write32(u32 addr, u32 v) { *(volatile u32 *)addr = v; }

/* ---- CPU ---- */
static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }
static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void hlt(void) { __asm__ volatile("hlt" ::: "memory"); }
/* sti takes effect after the next instruction: no interrupt is lost between them. */
static inline void sti_hlt(void) { __asm__ volatile("sti; hlt" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }
static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}
/* Busy loop of n iterations that the compiler cannot remove. */
static inline void delay_loop(u32 n)
{
    for (u32 i = 0; i < n; i++)
        __asm__ volatile("" ::: "memory");
}

/* i8042 reset pulse (outb 0x64, 0xFE), then cli; hlt forever. */
NORETURN void reset(void);
/* cli; hlt forever. */
NORETURN void halt_forever(void);

/* ---- COM1 16550 (0x3F8), polled ---- */
#define COM1 0x3F8
void putc(char c);
void puts(const char *s);            /* no newline added */
void print_hex(u32 v);               /* "0x" + minimal hex digits */
void print_hex64(u64 v);
void print_dec(u32 v);
void print_dec_pad(u32 v, u32 width);/* zero-padded to width */
int  getc(void);                     /* blocks until a byte is received */

/* ---- command line ---- */
/* The command line string ("" if none). */
const char *cmdline(const struct hvm_start_info *si);
/* Value of key=value (terminated by space or NUL), or NULL if key absent.
 * A bare "key" (no '=') returns a pointer to an empty value. */
const char *cmdline_get(const struct hvm_start_info *si, const char *key);
/* Parse an unsigned number: decimal, or hex with 0x prefix; stops at space/NUL.
 * Returns 0 on success and stores *out, -1 if there is no valid number. */
int parse_u32(const char *s, u32 *out);
/* cmdline_get + parse_u32, with a default when absent/invalid. */
u32 cmdline_u32(const struct hvm_start_info *si, const char *key, u32 dflt);

/* ---- IDT ---- */
/* Register frame seen by C interrupt handlers (pushed by RT_ISR stubs). */
struct rt_frame {
    u32 edi, esi, ebp, esp_unused, ebx, edx, ecx, eax;  /* pusha */
    u32 eip, cs, eflags;                               /* pushed by the CPU */
};
/* Set a 32-bit interrupt gate (selector 0x08, DPL 0) for vector vec. */
void idt_set_gate(u8 vec, void (*handler)(void));
/* lidt the runtime's 256-entry IDT. */
void idt_load(void);
/* lidt with an arbitrary base/limit. */
void lidt_raw(u32 base, u16 limit);

/*
 * Return from an interrupt/trap frame [EIP, CS, EFLAGS] (no error code).
 *
 * KVM's instruction emulator implements IRET only in real mode, and on this
 * project's KVM (kvm_pvm) all guest kernel-mode code is emulated, so a
 * protected-mode `iret` stops the VM with an emulation failure.  The default
 * return therefore rewrites the frame to [EFLAGS, EIP] and does `popfl; ret`:
 * the same thing for a same-privilege return with an unchanged CS (the only
 * case these guests have), except that IF may be set one instruction before
 * the `ret` (a nested interrupt there is harmless).  Build with
 * -DRT_USE_IRET to use a real `iret` (hardware KVM, or a VMM that emulates it).
 */
#ifdef RT_USE_IRET
#define RT_IRET_ASM "  iret\n"
#else
#define RT_IRET_ASM                                                     \
    "  push %eax\n"             /* eax, EIP, CS, EFLAGS */              \
    "  mov 12(%esp), %eax\n"                                            \
    "  mov %eax, 8(%esp)\n"     /* eax, EIP, EFLAGS, EFLAGS */          \
    "  mov 4(%esp), %eax\n"                                             \
    "  mov %eax, 12(%esp)\n"    /* eax, EIP, EFLAGS, EIP */             \
    "  pop %eax\n"                                                      \
    "  lea 4(%esp), %esp\n"     /* EFLAGS, EIP (lea: flags untouched) */\
    "  popfl\n"                                                         \
    "  ret\n"
#endif

/*
 * RT_ISR(stub, cfunc): define an asm entry point `stub` (for vectors that do
 * NOT push an error code) that saves the general registers, calls
 * void cfunc(struct rt_frame *) and returns from the interrupt (RT_IRET_ASM).
 * Declare the stub with RT_ISR_DECL(stub) to take its address.
 */
#define RT_ISR_DECL(stub) void stub(void)
#define RT_ISR(stub, cfunc)                                             \
    __asm__(".text\n"                                                   \
            ".globl " #stub "\n"                                        \
            ".type " #stub ", @function\n"                              \
            ".p2align 4\n"                                              \
            #stub ":\n"                                                 \
            "  pusha\n"                                                 \
            "  cld\n"                                                   \
            "  push %esp\n"                                             \
            "  call " #cfunc "\n"                                       \
            "  add $4, %esp\n"                                          \
            "  popa\n"                                                  \
            RT_IRET_ASM                                                 \
            ".size " #stub ", . - " #stub "\n")

/* ---- local APIC / IOAPIC ---- */
#define LAPIC_BASE   0xFEE00000u
#define LAPIC_EOI    0x0B0
#define LAPIC_SVR    0x0F0
#define IOAPIC_BASE  0xFEC00000u
void lapic_enable(u8 spurious_vector);
void lapic_eoi(void);
void ioapic_write(u32 reg, u32 val);
u32  ioapic_read(u32 reg);
/* Masks both 8259 PICs. */
void pic_mask_all(void);

/* ---- libc bits gcc may emit calls to ---- */
void *memset(void *d, int c, usize n);
void *memcpy(void *d, const void *s, usize n);
void *memmove(void *d, const void *s, usize n);
int memcmp(const void *a, const void *b, usize n);
usize strlen(const char *s);

/* The MC146818 RTC's time (BCD or binary, 12 or 24 h, with the century register);
 * -1 if status A's UIP never clears (no RTC). */
struct rtc_time { u32 year, month, day, hour, min, sec; };
int rtc_read_time(struct rtc_time *t);
/* Prints "YYYY-MM-DD HH:MM:SS\n". */
void rtc_print_time(const struct rtc_time *t);

#endif
