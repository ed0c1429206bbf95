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
"""
import sys

from grid.config import load_experiment, parse_shard, select_shard
from grid.report import write_report
from grid.runner import Runner, check_settings, plan
from utils.errors import OneLineArgumentParser, check_flag, exit_on_user_error


def get_args_parser(add_help=True):
    p = OneLineArgumentParser(description="Train and evaluate every cell of an experiment grid and write the "
                              "paper's tables and figures.", add_help=add_help)
    p.add_argument("experiment", help="experiment file (TOML), e.g. experiments/celeba299_cpu.toml")
    p.add_argument("--dry-run", action="store_true", help="list the cells with their status and a time estimate; "
                   "train nothing")
    p.add_argument("--jobs", type=int, default=1, help="cells run at once on this machine (default 1)")
    p.add_argument("--shard", default=None, metavar="I/N", help="run only every N-th cell from the I-th "
                   "(0-based), e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT")
    p.add_argument("--report", action="store_true", help="only rewrite results.csv, tables and figures "
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
    exp = load_experiment(args.experiment, data_root=args.data_root, device=args.device, out=args.out,
                          check_data=not args.report)  # a report needs no data
    cells = select_shard(exp.cells, shard)
    check_settings(cells)
    if args.report:
        paths = write_report(exp)
        print(f"{exp.name}: " + (f"{len(paths)} report files written to {exp.out_dir}" if paths
                                 else "no finished cell yet; nothing written"))
        return 0
    lines, estimates = plan(exp, cells, args.jobs, shard)
    if args.dry_run:
        print("\n".join(lines))
        return 0
    print(lines[0])
    print(lines[-1])
    failed = Runner(exp, cells, args.jobs).run(estimates)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
