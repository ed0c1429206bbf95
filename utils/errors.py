"""One exception type for bad user input, turned into a one-line message and exit code 2;
a quiet stop when the reader of standard output goes away (``script | head``)."""
import argparse
import functools
import os
import re
import select
import signal
import sys

EXIT_USAGE = 2
"""Exit status for bad input (the argparse convention)."""

EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE
"""Exit status when the reader of standard output has gone (141): what a shell reports for a
program ended by SIGPIPE, such as ``cat`` or ``yes`` in ``... | head``."""


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


def stdout_reader_gone():
    """Whether standard output is a pipe whose reading end is closed (poll reports POLLERR)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # no stdout, or a replaced one without a descriptor
        return False
    if not hasattr(select, "poll"):
        return True
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def quiet_broken_pipe(fn):
    """Decorator for a script's entry point: when the reader of standard output goes away
    (``script | head -2``), stop without a traceback and exit with ``EXIT_BROKEN_PIPE``.

    Python's documented recipe: catch BrokenPipeError, point the stdout descriptor at
    ``os.devnull`` (so the flush at interpreter exit cannot fail again), exit. Output still
    buffered when ``fn`` returns or exits is flushed inside the handler. A BrokenPipeError from
    anything but standard output (another pipe, a socket) is not hidden: it propagates.
    """
    @functools.wraps(fn)
    def inner(*args, **kwargs):
        try:
            try:
                result = fn(*args, **kwargs)
            except SystemExit:
                _flush_stdout()
                raise
            _flush_stdout()
            return result
        except BrokenPipeError:
            if not stdout_reader_gone():
                raise
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            sys.exit(EXIT_BROKEN_PIPE)
    return inner


def _flush_stdout():
    if sys.stdout is not None:
        sys.stdout.flush()


def exit_on_user_error(prog):
    """Decorator for a script's ``main``: print ``<prog>: error: <msg>`` on UserInputError
    (and on KeyboardInterrupt a short note), then exit with status 2 (130 on interrupt);
    a closed standard output ends it quietly (``quiet_broken_pipe``)."""
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
        return quiet_broken_pipe(inner)
    return wrap


class OneLineArgumentParser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line (``prog: error: ...``), exit status 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} -h)\n")
