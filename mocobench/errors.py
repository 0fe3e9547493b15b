"""One exception for bad input, and the CLI wrapper that prints it as one line."""
import functools
import sys


class UserError(Exception):
    """A problem the user can fix: the message is one line saying what is wrong
    and what to do. CLIs print it without a traceback and exit with status 2."""


def one_line(message: str) -> str:
    # A UserError raised in a DataLoader worker comes back re-raised with the
    # worker's traceback glued into the message; the user's line is the last one.
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    last = lines[-1]
    prefix = f"{UserError.__module__}.{UserError.__name__}: "
    for p in (prefix, "UserError: "):
        if last.startswith(p):
            return last[len(p):]
    return last if len(lines) > 1 else lines[0]


def cli(main):
    """Decorate a CLI entry point: UserError becomes `error: <line>` on stderr, exit 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {one_line(str(e))}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
