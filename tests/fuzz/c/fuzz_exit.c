/*
 * libFuzzer target: the vCPU thread's exit decoding (cext/vcpu_loop.c): a kvm_run page
 * filled by the fuzzer, then what the thread does with it — the UART fast path
 * (serve_fast_io: THR bytes appended to the console buffer, LSR reads answered from the
 * shadow) and, when that does not take it, fill_exit (the exit slot the loop reads: port
 * and MMIO accesses, internal errors, entry failures, system events, debug exits, anything
 * else). The fast path's slots are armed, re-armed and drained between exits as the UART
 * model and the loop do.
 *
 * The run page is a heap buffer of exactly the vCPU's mmap size, so ASan sees any access
 * outside it. Invariants: an I/O or MMIO exit handed to the loop has an access size it can
 * hold and its size*count bytes inside the page; the console buffer never holds more than
 * its capacity; a drain gives back at most what was taken.
 *
 * vcpu_loop.c is included: its decoding functions are static.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <sys/eventfd.h>

#include "../../../cext/vcpu_loop.c"
#include "cursor.h"

#define FUZZ_CHECK(cond)                                                                       \
    do {                                                                                       \
        if (!(cond)) {                                                                         \
            fprintf(stderr, "invariant broken at %s:%d: %s\n", __FILE__, __LINE__, #cond);     \
            abort();                                                                           \
        }                                                                                      \
    } while (0)

#define RUN_SIZE (3 * 4096) /* KVM_GET_VCPU_MMAP_SIZE on x86: the run page, PIO data, coalesced MMIO */

static const uint32_t reasons[] = {
    KVM_EXIT_IO, KVM_EXIT_MMIO, KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_FAIL_ENTRY, KVM_EXIT_SYSTEM_EVENT,
    KVM_EXIT_DEBUG, KVM_EXIT_SHUTDOWN, KVM_EXIT_HLT, KVM_EXIT_INTR, KVM_EXIT_UNKNOWN,
};

static struct avmm_vm *vm;
static uint8_t *run;
static size_t taken[AVMM_UART_FAST_SLOTS]; /* bytes in each console buffer, as this target counts them */
static uint8_t drained[CONSOLE_CAP];

static void check_exit(const struct avmm_exit *e)
{
    FUZZ_CHECK(e->kind >= AVMM_EXIT_IO && e->kind <= AVMM_EXIT_ERROR);
    if (e->kind != AVMM_EXIT_IO && e->kind != AVMM_EXIT_MMIO)
        return;
    FUZZ_CHECK(e->size >= 1 && e->size <= 8 && e->count >= 1);
    FUZZ_CHECK(e->data >= run && e->data + (uint64_t)e->size * e->count <= run + RUN_SIZE);
    volatile uint8_t sum = 0; /* the loop reads them all (string I/O: ffi.buffer(data, size*count)) */
    for (uint64_t i = 0; i < (uint64_t)e->size * e->count; i++)
        sum += e->data[i];
    (void)sum;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!vm) {
        vm = avmm_vm_new(1, eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC), eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
        run = malloc(RUN_SIZE);
        FUZZ_CHECK(vm && run);
        vm->vcpus[0].run = (struct kvm_run *)run;
        vm->vcpus[0].run_size = RUN_SIZE;
    }
    struct avmm_vcpu *v = &vm->vcpus[0];
    struct kvm_run *r = v->run;
    struct cursor in = {data, size};
    memset(run, 0, RUN_SIZE);
    for (int s = 0; s < AVMM_UART_FAST_SLOTS; s++) {
        avmm_uart_fast_set(vm, s, 0, 0, 0, 0);
        taken[s] -= avmm_console_drain(vm, s, drained, sizeof(drained));
        FUZZ_CHECK(taken[s] == 0);
    }
    avmm_console_ack(vm);

    while (in.n) {
        uint8_t op = take8(&in);
        switch (op % 4) {
        case 0: { /* the UART model arms a slot (ports as the guest programmed them) */
            int slot = (op >> 2) % AVMM_UART_FAST_SLOTS;
            uint16_t thr = take16(&in), lsr = take16(&in);
            uint8_t flags = take8(&in), shadow = take8(&in);
            avmm_uart_fast_set(vm, slot, thr, lsr, flags & 3, shadow);
            break;
        }
        case 1: { /* the loop drains a console buffer */
            int slot = (op >> 2) % AVMM_UART_FAST_SLOTS;
            size_t cap = (size_t)take16(&in) + 1;
            size_t n = avmm_console_drain(vm, slot, drained, cap);
            FUZZ_CHECK(n <= cap && n <= taken[slot]);
            taken[slot] -= n;
            avmm_console_ack(vm);
            break;
        }
        case 2: { /* bytes into the page: the PIO data, the union, anywhere */
            uint16_t at = take16(&in) % RUN_SIZE;
            take_bytes(&in, run + at, (RUN_SIZE - at) < 64 ? RUN_SIZE - at : 64);
            break;
        }
        default: { /* an exit: its reason and the union's first bytes, then the thread's decoding */
            uint8_t pick = take8(&in);
            r->exit_reason = pick < 0xF0 ? reasons[pick % (sizeof(reasons) / sizeof(reasons[0]))]
                                         : (uint32_t)take16(&in);
            take_bytes(&in, &r->io, 32);
            int err = (op & 0x80) ? EFAULT : 0;
            size_t before[AVMM_UART_FAST_SLOTS];
            for (int s = 0; s < AVMM_UART_FAST_SLOTS; s++)
                before[s] = vm->uart[s].len;
            if (!err && r->exit_reason == KVM_EXIT_IO && serve_fast_io(v)) {
                for (int s = 0; s < AVMM_UART_FAST_SLOTS; s++) {
                    FUZZ_CHECK(vm->uart[s].len <= CONSOLE_CAP && vm->uart[s].len >= before[s]);
                    taken[s] = vm->uart[s].len;
                }
                break;
            }
            fill_exit(v, err);
            check_exit(&v->exit);
            break;
        }
        }
    }
    return 0;
}
