/*
 * gdbtarget: a guest to debug with gdb (built with -g).  Prints "value=N round=R" in a
 * loop; a debugger reads and writes `value`, breaks at `tick`, watches `watched`.
 *   spin      no output: a tight loop (a debugger's Ctrl-C stops it)
 * It first prints "x2apic=B", B being CPUID.1:ECX[21] (x2APIC) as this guest sees it, then
 * "x2apic-mode=ok" or "x2apic-mode=#GP": what setting IA32_APIC_BASE.EXTD (turning the
 * local APIC to x2APIC mode) did; a CPU without x2APIC raises #GP (then it stays xAPIC).
 *   paging=32 / paging=pae   turn paging on first: identity-map the first 4 MiB and map
 *             ALIAS_VA to the page holding `value` (a debugger reads it there by its
 *             virtual address)
 */
#include "rt.h"

#define ALIAS_VA   0x40000000u
#define CR0_PG     0x80000000u
#define CR4_PSE    0x00000010u
#define CR4_PAE    0x00000020u
#define PTE_P      0x001u
#define PTE_W      0x002u
#define PTE_PS     0x080u

volatile u32 value = 7;        /* printed each round: a debugger writes it */
volatile u32 watched;          /* written by tick: a hardware watchpoint's target */
volatile u32 rounds;
volatile u32 gp_count;

#define IA32_APIC_BASE 0x1B
#define APIC_BASE_EXTD (1u << 10)  /* x2APIC mode */
#define GP_VECTOR 13

/* #GP pushes an error code: drop it, step over the 2-byte wrmsr that faulted, count it,
 * and return as the runtime's stubs do (rt.h RT_IRET_ASM). */
void gp_stub(void);
__asm__(".text\n.globl gp_stub\n.type gp_stub, @function\ngp_stub:\n"
        "  addl $4, %esp\n"
        "  addl $2, (%esp)\n"
        "  lock incl gp_count\n"
        RT_IRET_ASM
        ".size gp_stub, . - gp_stub\n");

static void x2apic_mode(void)
{
    u32 lo, hi;
    idt_set_gate(GP_VECTOR, gp_stub);
    idt_load();
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(IA32_APIC_BASE));
    lo |= APIC_BASE_EXTD;
    __asm__ volatile("wrmsr" : : "a"(lo), "d"(hi), "c"(IA32_APIC_BASE) : "memory");
    puts(gp_count ? "x2apic-mode=#GP\n" : "x2apic-mode=ok\n");
}

/* 32-bit paging: a page directory with 4 MiB pages, and one page table for the alias. */
static u32 pd32[1024] __attribute__((aligned(4096)));
static u32 pt32[1024] __attribute__((aligned(4096)));
/* PAE: a PDPT, one directory per GiB used (0 and 1), 2 MiB pages, a table for the alias. */
static u64 pdpt[4] __attribute__((aligned(32)));
static u64 pd_pae0[512] __attribute__((aligned(4096)));
static u64 pd_pae1[512] __attribute__((aligned(4096)));
static u64 pt_pae[512] __attribute__((aligned(4096)));

__attribute__((noinline)) u32 tick(u32 n)
{
    watched = n;
    rounds = n + 1;
    return n + 1;
}

static void paging_on(const char *mode)
{
    u32 page = (u32)&value & ~0xFFFu;
    u32 cr0, cr4, cr3;
    if (mode[0] == '3') {
        pd32[0] = 0 | PTE_P | PTE_W | PTE_PS;                 /* 0-4 MiB identity */
        pd32[ALIAS_VA >> 22] = (u32)pt32 | PTE_P | PTE_W;
        pt32[0] = page | PTE_P | PTE_W;
        cr3 = (u32)pd32;
        __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
        cr4 |= CR4_PSE;
    } else {
        pd_pae0[0] = 0 | PTE_P | PTE_W | PTE_PS;              /* 0-2 MiB identity */
        pd_pae0[1] = 0x200000 | PTE_P | PTE_W | PTE_PS;       /* 2-4 MiB identity */
        pd_pae1[0] = (u32)pt_pae | PTE_P | PTE_W;
        pt_pae[0] = page | PTE_P | PTE_W;
        pdpt[0] = (u32)pd_pae0 | PTE_P;
        pdpt[ALIAS_VA >> 30] = (u32)pd_pae1 | PTE_P;
        cr3 = (u32)pdpt;
        __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
        cr4 |= CR4_PAE;
    }
    __asm__ volatile("mov %0, %%cr4" : : "r"(cr4));
    __asm__ volatile("mov %0, %%cr3" : : "r"(cr3));
    __asm__ volatile("mov %%cr0, %0" : "=r"(cr0));
    __asm__ volatile("mov %0, %%cr0" : : "r"(cr0 | CR0_PG) : "memory");
    puts("paging on, alias value=");
    print_dec(*(volatile u32 *)(ALIAS_VA + ((u32)&value & 0xFFFu)));
    putc('\n');
}

void guest_main(const struct hvm_start_info *si)
{
    u32 delay = cmdline_u32(si, "delay", 20000);
    const char *mode = cmdline_get(si, "paging");

    u32 a = 1, b, c, d;
    __asm__ volatile("cpuid" : "+a"(a), "=b"(b), "=c"(c), "=d"(d) : "c"(0));
    puts("x2apic=");
    print_dec((c >> 21) & 1);
    putc('\n');
    x2apic_mode();
    if (mode)
        paging_on(mode);
    if (cmdline_get(si, "spin")) {
        puts("spinning\n");
        for (;;)
            rounds++;
    }
    puts("gdbtarget ready\n");
    for (u32 n = 0;;) {
        n = tick(n);
        puts("value=");
        print_dec(value);
        puts(" round=");
        print_dec(n);
        putc('\n');
        delay_loop(delay);
    }
}
