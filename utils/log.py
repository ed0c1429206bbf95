"""Console plus log-file output for the training script."""
import logging
import sys


def setup_logger(name, log_path=None):
    """A logger writing plain lines to stdout and, if ``log_path`` is given, appending to it.

    Returns: logging.Logger. Raises OSError if ``log_path`` cannot be opened.
    """
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    if log_path:
        fh = logging.FileHandler(log_path, mode="a", encoding="utf-8")
        fh.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(fh)
    return logger
