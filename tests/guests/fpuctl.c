/*
 * fpuctl: the x87/SSE control instructions firmware runs (fninit, fldcw, fnstcw,
 * fnstsw, fnclex, emms, ldmxcsr, stmxcsr), each checked by reading the state back,
 * through several addressing forms (disp32, base+index*scale+disp, 16-bit addressing,
 * an FS segment base), and the faults a CPU raises instead (#NM with CR0.TS, #GP(0) for
 * a reserved MXCSR bit). No paging: kvm_pvm refuses 32-bit and PAE paging (a triple
 * fault on the write of CR0.PG); the page walk is checked in tests/unit/test_fpu_control.py.
 * Prints "<name> ok" per check, or "<name> BAD <value>", then "fpuctl done".
 */
#include "rt.h"

struct gp_frame {
    u32 edi, esi, ebp, esp_unused, ebx, edx, ecx, eax; /* pusha */
    u32 error_code, eip, cs, eflags;                   /* pushed by the CPU */
};

static volatile u32 gp_count, gp_error, nm_count;
static volatile u32 gp_skip; /* bytes of the faulting instruction to skip */

void gp_handler(struct gp_frame *f)
{
    gp_count++;
    gp_error = f->error_code;
    f->eip += gp_skip;
}
/* #GP pushes an error code: drop it before the runtime's return sequence. */
__asm__(".text\n.globl isr_gp\n.p2align 4\nisr_gp:\n"
        "  pusha\n  cld\n  push %esp\n  call gp_handler\n  add $4, %esp\n  popa\n"
        "  lea 4(%esp), %esp\n" RT_IRET_ASM);
void isr_gp(void);

void nm_handler(struct rt_frame *f)
{
    (void)f;
    nm_count++;
    __asm__ volatile("clts" ::: "memory"); /* the instruction is retried and now runs */
}
RT_ISR(isr_nm, nm_handler);
RT_ISR_DECL(isr_nm);

static volatile u16 cw_in = 0x027F, cw_out, sw_out;
static volatile u16 cw_table[4] = {0, 0, 0x0A7F, 0};
static volatile u32 mx_in = 0x9FC0, mx_out, mx_bad = 0x10000 | 0x1F80;

/* The low 16 bits: a 16-bit address (with 0x67) can only reach the first 64 KiB. */
#define LOW_CW ((volatile u16 *)0x7000)
/* gdt: entry.S's code and data, and 0x18: data with base FS_BASE. */
#define FS_BASE 0x1000u
static const u64 gdt[4] __attribute__((aligned(8))) = {
    0, 0x00cf9a000000ffffull, 0x00cf92000000ffffull,
    0x00cf92000000ffffull | ((u64)(FS_BASE & 0xFFFFFF) << 16) | ((u64)(FS_BASE >> 24) << 56),
};

static int failures;

static void check(const char *name, u32 got, u32 want)
{
    puts(name);
    if (got == want) {
        puts(" ok\n");
        return;
    }
    puts(" BAD ");
    print_hex(got);
    putc('\n');
    failures++;
}

static u16 fnstcw(void)
{
    u16 v;
    __asm__ volatile("fnstcw %0" : "=m"(v));
    return v;
}

void guest_main(const struct hvm_start_info *si)
{
    (void)si;
    u32 cr0, cr4;
    u16 ax;
    idt_set_gate(13, isr_gp);
    idt_set_gate(7, isr_nm);
    idt_load();
    __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
    __asm__ volatile("mov %0, %%cr4" ::"r"(cr4 | (1u << 9)) : "memory"); /* OSFXSR */

    __asm__ volatile("fninit" ::: "memory");
    check("fninit", fnstcw(), 0x037F);
    /* disp32 */
    __asm__ volatile("fldcw cw_in" ::: "memory");
    check("fldcw disp32", fnstcw(), 0x027F);
    /* base + index * scale + disp8 */
    __asm__ volatile("fldcw 2(%0,%1,2)" ::"r"(cw_table), "r"(1) : "memory");
    check("fldcw sib", fnstcw(), 0x0A7F);
    /* 16-bit addressing (0x67), [bx+si] */
    *LOW_CW = 0x037B;
    __asm__ volatile("fldcw (%%bx,%%si)" ::"b"(0x7000), "S"(0) : "memory");
    check("fldcw addr16", fnstcw(), 0x037B);
    /* a segment base: FS = 0x18, base FS_BASE */
    struct { u16 limit; u32 base; } __attribute__((packed)) desc = {sizeof(gdt) - 1, (u32)gdt};
    __asm__ volatile("lgdt %0; mov $0x18, %%eax; mov %%eax, %%fs" ::"m"(desc) : "eax", "memory");
    *LOW_CW = 0x027B;
    __asm__ volatile("fldcw %%fs:(%0)" ::"r"(0x7000 - FS_BASE) : "memory");
    check("fldcw fs", fnstcw(), 0x027B);
    /* fnstsw to memory and to AX, after fnclex */
    __asm__ volatile("fnclex; fnstsw %0" : "=m"(sw_out));
    check("fnstsw", sw_out, 0);
    __asm__ volatile("fnstsw %%ax" : "=a"(ax));
    check("fnstsw ax", ax, 0);
    __asm__ volatile("emms" ::: "memory");
    check("emms", 1, 1);
    /* SSE control */
    __asm__ volatile("ldmxcsr mx_in; stmxcsr mx_out" ::: "memory");
    check("ldmxcsr", mx_out, 0x9FC0);
    gp_skip = 7; /* 0f ae 15 disp32 */
    __asm__ volatile("ldmxcsr mx_bad" ::: "memory");
    check("ldmxcsr reserved #GP", gp_count, 1);
    check("ldmxcsr #GP error code", gp_error, 0);
    __asm__ volatile("stmxcsr mx_out" ::: "memory");
    check("mxcsr unchanged", mx_out, 0x9FC0);
    /* CR0.TS: #NM first, then (the handler cleared TS) the instruction runs */
    __asm__ volatile("mov %%cr0, %0" : "=r"(cr0));
    __asm__ volatile("mov %0, %%cr0" ::"r"(cr0 | 8) : "memory");
    __asm__ volatile("fldcw cw_in" ::: "memory");
    check("fldcw with TS #NM", nm_count, 1);
    check("fldcw after #NM", fnstcw(), 0x027F);
    puts(failures ? "fpuctl FAILED\n" : "fpuctl done\n");
    reset();
}
