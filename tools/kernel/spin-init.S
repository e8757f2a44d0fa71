/*
 * An init that never makes a system call: for a Linux guest on a KVM where user space
 * cannot enter the kernel (kvm_pvm: `syscall` does not reach it, see KVM-HERE.md).
 * The kernel has started it, so it is past "Run /init as init process"; with an init
 * that never exits or faults, the kernel keeps running its own threads and interrupts
 * (SysRq, the network, disks), which is what the checks on such a KVM look at.
 * Static, position-dependent, no libc: one page of code.
 */
    .text
    .globl _start
_start:
1:  pause
    jmp 1b
