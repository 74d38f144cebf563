"""Run a command in a real pseudo-terminal of a fixed size and read the screen it leaves, after
terminal emulation (pyte): what a user at a terminal of that size would see."""
from __future__ import annotations

import os
import re
import select
import subprocess
import time

# a tqdm bar as drawn: "  87%|████▌ | 608/697 [..." or, closed narrow, "desc: 608/608, ..."
BAR = re.compile(r"\d+%\|.*\|\s*\d+/\d+|\|\s*\d+/\d+ \[")


def run_in_terminal(argv: list[str], columns: int, lines: int = 300, env: dict | None = None,
                    timeout: float = 600) -> tuple[int, list[str], str]:
    """(exit code, the screen's lines without trailing blanks or blank lines at the end, the
    raw text written) of ``argv`` run with stdin, stdout and stderr on one pseudo-terminal of
    ``columns`` x ``lines``."""
    import fcntl
    import struct
    import termios

    import pyte

    env = {k: v for k, v in (env if env is not None else os.environ).items() if k not in ("COLUMNS", "LINES")}
    env.setdefault("TERM", "xterm-256color")
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
    screen = pyte.Screen(columns, lines)
    stream = pyte.ByteStream(screen)
    raw = bytearray()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every writer closed the terminal
                    break
                if not data:
                    break
                raw += data
                stream.feed(data)
            elif proc.poll() is not None:
                break  # exited and nothing left to read (a daemon it started may hold the terminal)
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(f"{argv} ran past {timeout}s; screen so far:\n" + "\n".join(screen.display))
    finally:
        os.close(master)
    rc = proc.wait(timeout=60)
    shown = [line.rstrip() for line in screen.display]
    while shown and not shown[-1]:
        shown.pop()
    return rc, shown, raw.decode(errors="replace")


def occurrences(screen: list[str], message: str, columns: int) -> int:
    """How many times ``message`` stands on the screen as whole lines of its own (a message
    wider than the terminal continues on the next lines, ``columns`` characters each)."""
    chunks = [message[i:i + columns].rstrip() for i in range(0, max(len(message), 1), columns)]
    return sum(1 for i in range(len(screen) - len(chunks) + 1)
               if all(screen[i + k] == c for k, c in enumerate(chunks)))
