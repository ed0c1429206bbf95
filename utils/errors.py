"""One exception type for bad user input, turned into a one-line message and exit code 2."""
import argparse
import functools
import re
import sys

EXIT_USAGE = 2
"""Exit status for bad input (the argparse convention)."""


class UserInputError(Exception):
    """Bad input from the user: a flag, a file or a folder. The message names it and says
    what was expected; the scripts print ``error: <message>`` and exit with status 2."""


def check_flag(flag, value, minimum=1):
    """Raise UserInputError unless ``value`` (an int flag, None = unset) is at least ``minimum``."""
    if value is not None and value < minimum:
        expected = "a positive integer" if minimum == 1 else f">= {minimum}"
        raise UserInputError(f"{flag} {value}: must be {expected}")


def one_line(error):
    """The message of ``error`` on one line; for errors re-raised from a DataLoader worker
    (whose text carries the worker's traceback) the original message, i.e. the last line."""
    lines = [ln for ln in str(error).strip().splitlines() if ln.strip()]
    if not lines:
        return type(error).__name__
    if len(lines) > 1 and "Traceback" in str(error):
        return re.sub(r"^[\w.]*" + type(error).__name__ + ": ", "", lines[-1])
    return " ".join(ln.strip() for ln in lines)


def exit_on_user_error(prog):
    """Decorator for a script's ``main``: print ``<prog>: error: <msg>`` on UserInputError
    (and on KeyboardInterrupt a short note), then exit with status 2 (130 on interrupt)."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except UserInputError as e:
                print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
                sys.exit(EXIT_USAGE)
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                sys.exit(130)
        return inner
    return wrap


class OneLineArgumentParser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line (``prog: error: ...``), exit status 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} -h)\n")
