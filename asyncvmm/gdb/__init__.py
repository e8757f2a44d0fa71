"""A GDB remote-serial-protocol server for the guest (bhyve's `-g PORT`, `-G [w][ADDRESS:]PORT`).

Modules, each after what it models:
  packets      RSP framing: `$payload#xx`, acks, Ctrl-C, escapes
  registers    the i386:x86-64 target description and the register layout gdb reads
  paging       guest page-table walks: linear to guest physical in every paging mode
  breakpoints  software breakpoints (int3 in guest memory) and the debug registers
  target       the machine as gdb sees it: vCPUs held and released, memory, debug exits
  stub         the protocol's commands, one handler each
  server       the listening socket on the loop, one client at a time
"""
