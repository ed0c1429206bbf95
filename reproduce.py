"""Reproduce the paper's tables and figures: train and evaluate every cell (method x code length x
seed) of an experiment file, then write results.csv, the tables and the figures.

    python reproduce.py experiments/celeba299_cpu.toml --dry-run     # the cells and a time estimate
    python reproduce.py experiments/celeba299_cpu.toml               # run (a rerun skips finished cells)
    python reproduce.py experiments/facescrub.toml --jobs 4          # 4 cells at once on this machine
    python reproduce.py experiments/facescrub.toml --shard 3/16      # every 16th cell from the 4th
    python reproduce.py experiments/facescrub.toml --report          # only rebuild tables and figures

Each cell is trained by dcdh_train.py's code and evaluated by evaluation.py's code into
``runs/<experiment>/<method>-<bits>b-s<seed>/``; docs/reproduce.md describes the experiment file
and the outputs. Exit status: 0, 1 when a cell failed (the others ran), 2 for a bad experiment
file or flag (nothing ran).

Before anything trains, the file is checked as dcdh_train.py would check each cell (its setup,
the batch size against the training set, the data folder's contents: an empty split, a corrupt
.pkl; ``--dry-run`` too) and so is this machine (the device, the
DCDH_MEMORY_LIMIT_BYTES setting, --pretrained weights in the local cache; ``--dry-run`` only
notes a machine problem, ``--report`` skips it), and the output folder is created: a problem is
one line naming the key, exit status 2, and no cell folder is made. A cell folder that holds
no progress (a cell that failed before its first epoch) does not tie the cell to the settings
it was tried with: after a fix of the file the next run takes it over (grid/runner.py).
"""
import re
import sys

from grid.config import check_machine, default_jobs, load_experiment, parse_shard, select_shard
from grid.estimate import measured, speed_note
from grid.report import write_report
from grid.runner import Runner, check_data, check_settings, make_out_dir, plan
from utils.errors import OneLineArgumentParser, UserInputError, check_flag, exit_on_user_error


class _Parser(OneLineArgumentParser):
    """Takes ``--shard -1/2`` as a (bad) value of --shard, not as an unknown option, so that
    parse_shard names what is expected."""

    def parse_known_args(self, args=None, namespace=None):
        args, joined = list(sys.argv[1:] if args is None else args), []
        while args:
            arg = args.pop(0)
            if arg == "--shard" and args and re.match(r"-\d", args[0]):
                arg = f"--shard={args.pop(0)}"
            joined.append(arg)
        return super().parse_known_args(joined, namespace)


def get_args_parser(add_help=True):
    p = _Parser(description="Train and evaluate every cell of an experiment grid and write the "
                              "paper's tables and figures.", add_help=add_help)
    p.add_argument("experiment", help="experiment file (TOML), e.g. experiments/celeba299_cpu.toml")
    what = p.add_mutually_exclusive_group()  # --dry-run --report: which one was meant is unclear
    what.add_argument("--dry-run", action="store_true", help="list the cells with their status and a time "
                      "estimate; train nothing")
    p.add_argument("--jobs", type=int, default=None, help="cells run at once on this machine (default: on the "
                   "CPU as many as its cores hold at each cell's `threads`, one on a GPU)")
    p.add_argument("--shard", default=None, metavar="I/N", help="run only every N-th cell from the I-th "
                   "(0-based), e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT")
    what.add_argument("--report", action="store_true", help="only rewrite results.csv, tables and figures "
                      "from the finished cells (e.g. after the shards of a job array)")
    p.add_argument("--data-root", default=None, help="replace the file's data_root")
    p.add_argument("--device", default=None, help="replace the file's device (cpu, cuda, cuda:N)")
    p.add_argument("--out", default=None, help="replace the file's output folder (default runs): "
                   "cells go to OUT/<experiment name>/")
    return p


@exit_on_user_error("reproduce.py")
def main(args):
    check_flag("--jobs", args.jobs)
    shard = parse_shard(args.shard) if args.shard is not None else None
    # a report needs no data and no device; a dry run may be planned on a machine without the GPU
    exp = load_experiment(args.experiment, data_root=args.data_root, device=args.device, out=args.out,
                          check_data=not args.report, machine=not (args.report or args.dry_run))
    if not args.report:
        check_data(exp)  # the data's contents as the trainer reads them, before any folder is made
    cells = select_shard(exp.cells, shard)
    check_settings(cells)
    out_key = f"--out {args.out}" if args.out else f"{args.experiment}: out"
    if args.report:
        try:
            paths = write_report(exp, warn=print)  # the runner's one-line warning for an unusable metrics.json
        except OSError as e:
            raise UserInputError(f"{out_key}: cannot write the report to {exp.out_dir}: {e.strerror or e}") from None
        print(f"{exp.name}: " + (f"{len(paths)} report files written to {exp.out_dir}" if paths
                                 else "no finished cell yet; nothing written"))
        return 0
    if args.dry_run:  # refused here as the run would refuse it (nothing is made), before any timing
        make_out_dir(exp, out_key, create=False)
    jobs = args.jobs or default_jobs(exp, cells)  # each cell's thread count is fixed (threads), whatever jobs is
    lines, estimates = plan(exp, cells, jobs, shard)
    lines.insert(-1, speed_note(measured(exp)))  # where the images/s came from: this machine only
    if args.dry_run:
        try:
            check_machine(exp)
        except UserInputError as e:
            lines.append(f"note: this machine cannot run the cells: {e}")
        print("\n".join(lines))
        return 0
    make_out_dir(exp, out_key)
    print(lines[0])
    print(lines[-2])
    print(lines[-1])
    failed = Runner(exp, cells, jobs).run(estimates)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
