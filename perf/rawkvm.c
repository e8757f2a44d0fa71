/*
 * rawkvm.c - the "raw C KVM_RUN loop" anchor for the asyncvmm exit benchmark.
 *
 *   rawkvm GUEST.elf [CMDLINE]
 *
 * Boots a PVH ELF guest (Xen PHYS32_ENTRY note) on one vCPU in 32-bit
 * protected mode and handles every port-I/O exit inline:
 *   OUT 0x3F8          -> byte to stdout
 *   IN  0x3FD          -> 0x60 (THRE|TEMT)
 *   OUT 0x64 <- 0xFE   -> stop (exit status 0)
 *   other IN           -> 0xff
 *   other OUT          -> counted
 * Any other exit stops the VM with exit status 1.  At the end prints
 *   rawkvm: exits=N io_exits=N seconds=S us_per_exit=U other_outs=N
 * on stderr, timed with CLOCK_MONOTONIC from the first KVM_RUN to the stop, then
 *   rawkvm: cycle_p50_us=X cycle_p99_us=X
 * the percentiles of the period between one KVM_RUN return and the next (a guest round
 * trip), from a histogram with asyncvmm's buckets (cext/vcpu_loop.c hist_bucket: 8 per
 * power of two, the middle of the bucket reported).
 * SIGINT/SIGTERM stop the VM (status 1) after flushing the output.
 *
 * Build: gcc -O2 -Wall -Werror -o rawkvm rawkvm.c
 */
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define RAM_SIZE        (64UL << 20)
#define TSS_ADDR        0xfffbd000UL
#define START_INFO_GPA  0x1000UL
#define MEMMAP_GPA      0x1800UL
#define CMDLINE_GPA     0x2000UL
#define CMDLINE_MAX     0x1000UL
#define XEN_ELFNOTE_PHYS32_ENTRY 18

struct hvm_start_info {
    uint32_t magic;
    uint32_t version;
    uint32_t flags;
    uint32_t nr_modules;
    uint64_t modlist_paddr;
    uint64_t cmdline_paddr;
    uint64_t rsdp_paddr;
    uint64_t memmap_paddr;
    uint32_t memmap_entries;
    uint32_t reserved;
};

struct hvm_memmap_table_entry {
    uint64_t addr;
    uint64_t size;
    uint32_t type;
    uint32_t reserved;
};

static volatile sig_atomic_t stop_requested;
static struct kvm_run *volatile run_for_signal;

static void die(const char *what)
{
    perror(what);
    exit(2);
}

static void fail(const char *msg)
{
    fprintf(stderr, "rawkvm: %s\n", msg);
    exit(2);
}

static void on_signal(int sig)
{
    (void)sig;
    stop_requested = 1;
    if (run_for_signal)
        run_for_signal->immediate_exit = 1;
}

/* ---------------- ELF loading ---------------- */

struct seg {
    uint32_t type;
    uint64_t offset, paddr, filesz, memsz;
};

static int get_segs(const uint8_t *img, size_t size, struct seg *segs, int max)
{
    if (size < EI_NIDENT || memcmp(img, ELFMAG, SELFMAG))
        fail("not an ELF file");
    int n = 0;
    if (img[EI_CLASS] == ELFCLASS32) {
        const Elf32_Ehdr *eh = (const void *)img;
        if (size < sizeof(*eh) || eh->e_phoff + (uint64_t)eh->e_phnum * sizeof(Elf32_Phdr) > size)
            fail("truncated ELF32 header");
        for (int i = 0; i < eh->e_phnum && n < max; i++) {
            const Elf32_Phdr *ph = (const void *)(img + eh->e_phoff + i * sizeof(Elf32_Phdr));
            segs[n++] = (struct seg){ ph->p_type, ph->p_offset, ph->p_paddr, ph->p_filesz, ph->p_memsz };
        }
    } else if (img[EI_CLASS] == ELFCLASS64) {
        const Elf64_Ehdr *eh = (const void *)img;
        if (size < sizeof(*eh) || eh->e_phoff + (uint64_t)eh->e_phnum * sizeof(Elf64_Phdr) > size)
            fail("truncated ELF64 header");
        for (int i = 0; i < eh->e_phnum && n < max; i++) {
            const Elf64_Phdr *ph = (const void *)(img + eh->e_phoff + i * sizeof(Elf64_Phdr));
            segs[n++] = (struct seg){ ph->p_type, ph->p_offset, ph->p_paddr, ph->p_filesz, ph->p_memsz };
        }
    } else {
        fail("unknown ELF class");
    }
    return n;
}

/* Loads PT_LOAD segments at their physical address; returns the PVH entry. */
static uint32_t load_pvh_elf(const char *path, uint8_t *ram)
{
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        die(path);
    struct stat st;
    if (fstat(fd, &st) < 0)
        die("fstat");
    size_t size = st.st_size;
    uint8_t *img = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (img == MAP_FAILED)
        die("mmap guest image");
    close(fd);

    struct seg segs[64];
    int n = get_segs(img, size, segs, 64);
    int64_t entry = -1;
    for (int i = 0; i < n; i++) {
        struct seg *s = &segs[i];
        if (s->offset + s->filesz > size)
            fail("segment beyond end of file");
        if (s->type == PT_LOAD) {
            if (s->filesz > s->memsz || s->paddr + s->memsz > RAM_SIZE)
                fail("PT_LOAD segment outside guest RAM");
            memcpy(ram + s->paddr, img + s->offset, s->filesz);
            memset(ram + s->paddr + s->filesz, 0, s->memsz - s->filesz);
        } else if (s->type == PT_NOTE) {
            uint64_t off = s->offset, end = s->offset + s->filesz;
            while (off + 12 <= end) {
                const uint32_t *nh = (const void *)(img + off);
                uint32_t namesz = nh[0], descsz = nh[1], type = nh[2];
                uint64_t name = off + 12;
                uint64_t desc = name + ((namesz + 3) & ~3u);
                uint64_t next = desc + ((descsz + 3) & ~3u);
                if (next > end)
                    break;
                if (namesz == 4 && !memcmp(img + name, "Xen", 4) &&
                    type == XEN_ELFNOTE_PHYS32_ENTRY && descsz >= 4) {
                    uint32_t e;
                    memcpy(&e, img + desc, 4);
                    entry = e;
                }
                off = next;
            }
        }
    }
    munmap(img, size);
    if (entry < 0)
        fail("no Xen PHYS32_ENTRY (type 18) note: not a PVH image");
    return (uint32_t)entry;
}

/* ---------------- vCPU setup ---------------- */

static void setup_cpuid(int kvm, int vcpu)
{
    int nent = 128;
    for (;;) {
        struct kvm_cpuid2 *c = calloc(1, sizeof(*c) + nent * sizeof(struct kvm_cpuid_entry2));
        if (!c)
            die("calloc");
        c->nent = nent;
        if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, c) == 0) {
            if (ioctl(vcpu, KVM_SET_CPUID2, c) < 0)
                die("KVM_SET_CPUID2");
            free(c);
            return;
        }
        free(c);
        if (errno != E2BIG || nent >= 4096)
            die("KVM_GET_SUPPORTED_CPUID");
        nent *= 2;
    }
}

static void setup_regs(int vcpu, uint32_t entry)
{
    struct kvm_sregs sr;
    if (ioctl(vcpu, KVM_GET_SREGS, &sr) < 0)
        die("KVM_GET_SREGS");
    struct kvm_segment code = {
        .base = 0, .limit = 0xffffffff, .selector = 0x8, .type = 0xb,
        .present = 1, .dpl = 0, .db = 1, .s = 1, .l = 0, .g = 1,
    };
    struct kvm_segment data = code;
    data.selector = 0x10;
    data.type = 0x3;
    sr.cs = code;
    sr.ds = sr.es = sr.fs = sr.gs = sr.ss = data;
    sr.tr = (struct kvm_segment){
        .base = 0, .limit = 0x67, .selector = 0, .type = 0xb, .present = 1,
    };
    sr.cr0 = 0x1 | 0x10;        /* PE | ET */
    sr.cr4 = 0;
    sr.efer = 0;
    if (ioctl(vcpu, KVM_SET_SREGS, &sr) < 0)
        die("KVM_SET_SREGS");

    struct kvm_regs r;
    memset(&r, 0, sizeof(r));
    r.rflags = 0x2;
    r.rip = entry;
    r.rbx = START_INFO_GPA;
    if (ioctl(vcpu, KVM_SET_REGS, &r) < 0)
        die("KVM_SET_REGS");
}

static const char *exit_name(uint32_t r)
{
    switch (r) {
    case KVM_EXIT_UNKNOWN: return "UNKNOWN";
    case KVM_EXIT_EXCEPTION: return "EXCEPTION";
    case KVM_EXIT_IO: return "IO";
    case KVM_EXIT_HYPERCALL: return "HYPERCALL";
    case KVM_EXIT_DEBUG: return "DEBUG";
    case KVM_EXIT_HLT: return "HLT";
    case KVM_EXIT_MMIO: return "MMIO";
    case KVM_EXIT_IRQ_WINDOW_OPEN: return "IRQ_WINDOW_OPEN";
    case KVM_EXIT_SHUTDOWN: return "SHUTDOWN";
    case KVM_EXIT_FAIL_ENTRY: return "FAIL_ENTRY";
    case KVM_EXIT_INTR: return "INTR";
    case KVM_EXIT_INTERNAL_ERROR: return "INTERNAL_ERROR";
    case KVM_EXIT_SYSTEM_EVENT: return "SYSTEM_EVENT";
    default: return "?";
    }
}

#define HIST_SUB_BITS 3
#define HIST_BUCKETS 256
static uint64_t cycle_hist[HIST_BUCKETS];

static int hist_bucket(uint64_t ns)
{
    if (ns < (1u << HIST_SUB_BITS))
        return (int)ns;
    int msb = 63 - __builtin_clzll(ns);
    int i = ((msb - HIST_SUB_BITS + 1) << HIST_SUB_BITS) + (int)((ns >> (msb - HIST_SUB_BITS)) & ((1u << HIST_SUB_BITS) - 1));
    return i < HIST_BUCKETS ? i : HIST_BUCKETS - 1;
}

static uint64_t hist_bucket_ns(int i)
{
    if (i < (1 << HIST_SUB_BITS))
        return (uint64_t)i;
    return (uint64_t)((1u << HIST_SUB_BITS) + (i & ((1u << HIST_SUB_BITS) - 1))) << ((i >> HIST_SUB_BITS) - 1);
}

static double hist_percentile_us(double q)
{
    uint64_t total = 0, seen = 0;
    for (int i = 0; i < HIST_BUCKETS; i++)
        total += cycle_hist[i];
    if (!total)
        return 0;
    for (int i = 0; i < HIST_BUCKETS; i++) {
        seen += cycle_hist[i];
        if (seen >= q * total)
            return (hist_bucket_ns(i) + hist_bucket_ns(i + 1)) / 2 / 1e3;
    }
    return 0;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: %s GUEST.elf [CMDLINE]\n", argv[0]);
        return 2;
    }
    const char *cmdline = argc > 2 ? argv[2] : "";
    if (strlen(cmdline) >= CMDLINE_MAX)
        fail("command line too long");

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("/dev/kvm");
    if (ioctl(kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION)
        fail("unexpected KVM API version");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        die("KVM_CREATE_VM");
    if (ioctl(vm, KVM_SET_TSS_ADDR, TSS_ADDR) < 0)
        die("KVM_SET_TSS_ADDR");
    if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0)
        die("KVM_CREATE_IRQCHIP");
    struct kvm_pit_config pit = { .flags = 0 };
    if (ioctl(vm, KVM_CREATE_PIT2, &pit) < 0)
        die("KVM_CREATE_PIT2");

    uint8_t *ram = mmap(NULL, RAM_SIZE, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (ram == MAP_FAILED)
        die("mmap guest RAM");
    struct kvm_userspace_memory_region region = {
        .slot = 0, .flags = 0, .guest_phys_addr = 0,
        .memory_size = RAM_SIZE, .userspace_addr = (uintptr_t)ram,
    };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        die("KVM_SET_USER_MEMORY_REGION");

    uint32_t entry = load_pvh_elf(argv[1], ram);

    /* start_info + memory map + command line in low memory */
    struct hvm_memmap_table_entry mm[2] = {
        { .addr = 0, .size = 0xA0000, .type = 1 },
        { .addr = 0x100000, .size = RAM_SIZE - 0x100000, .type = 1 },
    };
    memcpy(ram + MEMMAP_GPA, mm, sizeof(mm));
    strcpy((char *)ram + CMDLINE_GPA, cmdline);
    struct hvm_start_info si = {
        .magic = 0x336ec578, .version = 1, .flags = 0, .nr_modules = 0,
        .modlist_paddr = 0, .cmdline_paddr = CMDLINE_GPA, .rsdp_paddr = 0,
        .memmap_paddr = MEMMAP_GPA, .memmap_entries = 2,
    };
    memcpy(ram + START_INFO_GPA, &si, sizeof(si));

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        die("KVM_CREATE_VCPU");
    int mmap_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (mmap_size < (int)sizeof(struct kvm_run))
        die("KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        die("mmap kvm_run");
    setup_cpuid(kvm, vcpu);
    setup_regs(vcpu, entry);

    run_for_signal = run;
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;      /* no SA_RESTART: KVM_RUN returns EINTR */
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);

    uint64_t exits = 0, io_exits = 0, other_outs = 0;
    int status = 1;
    double t0 = now();
    uint64_t last_exit = 0;
    for (;;) {
        if (stop_requested) {
            fflush(stdout);
            fprintf(stderr, "rawkvm: stopped by signal\n");
            break;
        }
        if (ioctl(vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            perror("KVM_RUN");
            break;
        }
        exits++;
        uint64_t t = now_ns();
        if (last_exit)
            cycle_hist[hist_bucket(t - last_exit)]++;
        last_exit = t;
        if (run->exit_reason == KVM_EXIT_IO) {
            io_exits++;
            uint8_t *data = (uint8_t *)run + run->io.data_offset;
            uint16_t port = run->io.port;
            uint32_t bytes = run->io.size * run->io.count;
            if (run->io.direction == KVM_EXIT_IO_OUT) {
                if (port == 0x3F8) {
                    for (uint32_t i = 0; i < bytes; i += run->io.size)
                        putchar(data[i]);
                } else if (port == 0x64 && data[0] == 0xFE) {
                    status = 0;
                    break;
                } else {
                    other_outs++;
                }
            } else {
                memset(data, port == 0x3FD ? 0x60 : 0xff, bytes);
            }
            continue;
        }
        fflush(stdout);
        fprintf(stderr, "rawkvm: stopped on exit reason %u (%s)",
                run->exit_reason, exit_name(run->exit_reason));
        if (run->exit_reason == KVM_EXIT_INTERNAL_ERROR) {
            fprintf(stderr, " suberror=%u", run->internal.suberror);
            if (run->internal.suberror == KVM_INTERNAL_ERROR_EMULATION) {
                fprintf(stderr, " (emulation failure)");
                if (run->emulation_failure.ndata >= 3 &&
                    (run->emulation_failure.flags &
                     KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES)) {
                    uint32_t n = run->emulation_failure.insn_size;
                    if (n > sizeof(run->emulation_failure.insn_bytes))
                        n = sizeof(run->emulation_failure.insn_bytes);
                    fprintf(stderr, " insn=");
                    for (uint32_t i = 0; i < n; i++)
                        fprintf(stderr, "%02x", run->emulation_failure.insn_bytes[i]);
                }
            }
            uint32_t nd = run->internal.ndata;
            if (nd > sizeof(run->internal.data) / sizeof(run->internal.data[0]))
                nd = sizeof(run->internal.data) / sizeof(run->internal.data[0]);
            for (uint32_t i = 0; i < nd; i++)
                fprintf(stderr, " data[%u]=0x%llx", i,
                        (unsigned long long)run->internal.data[i]);
        } else if (run->exit_reason == KVM_EXIT_FAIL_ENTRY) {
            fprintf(stderr, " hardware_entry_failure_reason=0x%llx",
                    (unsigned long long)run->fail_entry.hardware_entry_failure_reason);
        } else if (run->exit_reason == KVM_EXIT_MMIO) {
            fprintf(stderr, " addr=0x%llx len=%u %s",
                    (unsigned long long)run->mmio.phys_addr, run->mmio.len,
                    run->mmio.is_write ? "write" : "read");
        } else if (run->exit_reason == KVM_EXIT_SYSTEM_EVENT) {
            fprintf(stderr, " type=%u", run->system_event.type);
        }
        struct kvm_regs r;
        if (ioctl(vcpu, KVM_GET_REGS, &r) == 0)
            fprintf(stderr, " rip=0x%llx", (unsigned long long)r.rip);
        fputc('\n', stderr);
        break;
    }
    double secs = now() - t0;
    fflush(stdout);
    fprintf(stderr, "rawkvm: exits=%llu io_exits=%llu seconds=%.6f us_per_exit=%.3f other_outs=%llu\n",
            (unsigned long long)exits, (unsigned long long)io_exits, secs,
            exits ? secs * 1e6 / exits : 0.0, (unsigned long long)other_outs);
    fprintf(stderr, "rawkvm: cycle_p50_us=%.3f cycle_p99_us=%.3f\n", hist_percentile_us(0.50), hist_percentile_us(0.99));
    return status;
}
