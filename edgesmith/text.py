"""Text that came from a file, a network peer or a model, made safe to print."""

from __future__ import annotations

__all__ = ["printable"]


def printable(text: object) -> str:
    """``text`` with control and other non-printable characters escaped (``\\x1b``, ``\\u202e``).

    For anything that came from a file or the network (manifest strings, paths, labels, tensor
    names, channel reasons) before it reaches a terminal or a log: an escape sequence in a bundle
    must not rewrite the screen.

    Example:
        >>> printable("rpi5\\x1b[2J")
        'rpi5\\\\x1b[2J'
    """
    s = str(text)
    if s.isprintable():
        return s
    out = []
    for c in s:
        if c.isprintable():
            out.append(c)
        elif ord(c) < 0x100:
            out.append(f"\\x{ord(c):02x}")
        elif ord(c) < 0x10000:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(f"\\U{ord(c):08x}")
    return "".join(out)
