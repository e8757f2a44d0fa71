"""`asyncvmm ctl`: the bhyvectl of asyncvmm, a client of each running VM's control socket.

Two spellings of the same requests:

    asyncvmm ctl COMMAND NAME [options] [--json]     the table in commands.py
    asyncvmm ctl --vm=NAME [--cpu=N] --get-rip ...   bhyvectl's options (bhyvectl.py)

Exit status: 0 done; 1 the command failed (the VM's error answer, no answer in time);
2 bad usage, a request the VM refuses as given (no such vCPU, a value no register can
hold), no such VM (no socket, or a stale one), or a bhyvectl option that asyncvmm does
not take. Every error is one line on stderr, prefixed "asyncvmm: ".
"""

from __future__ import annotations

import os
import sys
import textwrap

from .. import log
from ..errors import ConfigError, VmmError
from . import bhyvectl, commands

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

EXIT_HELP = """\
exit status:
  0  done
  1  the command failed (the VM's error answer, no answer in time)
  2  bad usage, a value the VM refuses as given, no such VM (no socket, or a stale one),
     an option asyncvmm does not take
"""


def help_text() -> str:
    """The help, generated from the commands' parsers and bhyvectl's option table."""
    usage = commands.usage_lines()
    lines = ["usage: " + usage[0]] + ["       " + u for u in usage[1:]]
    lines.append("       asyncvmm ctl --vm=NAME [--cpu=N] [bhyvectl options] [--json]")
    lines.append("")
    lines.append("Control a running VM through its control socket (the analogue of bhyve's /dev/vmm/NAME).")
    lines.append("`asyncvmm ctl COMMAND --help` says more about one command.")
    lines.append("")
    lines.append("commands:")
    for c in commands.COMMANDS:
        lines += textwrap.wrap(c.help, 92, initial_indent=f"  {c.name:<9}  ", subsequent_indent=" " * 13)
    lines.append("  --json     print the VM's answer as JSON instead of text (every command)")
    lines.append("")
    return "\n".join(lines) + "\n" + bhyvectl.HELP + "\n" + EXIT_HELP


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if not argv:
            raise ConfigError(
                f"ctl needs a command: {', '.join(c.name for c in commands.COMMANDS)} "
                "(or bhyvectl's --vm=NAME ...); see asyncvmm ctl --help"
            )
        if argv[0] in ("-h", "--help", "help") or (argv[0].startswith("--") and ("--help" in argv or "-h" in argv)):
            _out(help_text())
            return EXIT_OK
        if argv[0] in commands.BY_NAME and ("--help" in argv or "-h" in argv):
            _out(commands.command_help(argv[0]))
            return EXIT_OK
        if argv[0] == "--json" and len(argv) > 1 and not argv[1].startswith("-"):
            argv = argv[1:] + ["--json"]  # `ctl --json state NAME` as well as `ctl state NAME --json`
        text = bhyvectl.run(argv) if bhyvectl.is_bhyvectl(argv) else commands.run(argv)
        if text:
            _out(text)
        return EXIT_OK
    except ConfigError as e:
        log.error(str(e))
        return EXIT_USAGE
    except VmmError as e:
        log.error(str(e))
        return EXIT_FAILED
    except KeyboardInterrupt:
        log.error("interrupted")
        return EXIT_FAILED
    except BrokenPipeError:  # `asyncvmm ctl stats NAME | head`: the reader has had enough
        _silence_stdout()
        return EXIT_OK
    except Exception as e:  # noqa: BLE001 (a bug, or an answer this version cannot read: one line)
        log.error(f"internal error in ctl: {type(e).__name__}: {e}")
        return EXIT_FAILED


def _out(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    sys.stdout.flush()


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
