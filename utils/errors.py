"""One exception type for bad user input, turned into a one-line message and exit code 2."""
import functools
import sys

EXIT_USAGE = 2
"""Exit status for bad input (the argparse convention)."""


class UserInputError(Exception):
    """Bad input from the user: a flag, a file or a folder. The message names it and says
    what was expected; the scripts print ``error: <message>`` and exit with status 2."""


def exit_on_user_error(prog):
    """Decorator for a script's ``main``: print ``<prog>: error: <msg>`` on UserInputError
    (and on KeyboardInterrupt a short note), then exit with status 2 (130 on interrupt)."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except UserInputError as e:
                print(f"{prog}: error: {e}", file=sys.stderr)
                sys.exit(EXIT_USAGE)
            except KeyboardInterrupt:
                print(f"{prog}: interrupted", file=sys.stderr)
                sys.exit(130)
        return inner
    return wrap
