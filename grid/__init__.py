"""Experiment grids: the paper's tables and figures from one command (``reproduce.py``).

An experiment file (TOML, ``experiments/*.toml``) names a dataset, methods, code lengths and
seeds; every (method, bits, seed) is a *cell*, trained by ``dcdh_train.py``'s code and evaluated
by ``evaluation.py``'s code into ``<out>/<experiment>/<method>-<bits>b-s<seed>/``.

    config.py    read and check the experiment file; the cells and their command lines
    estimate.py  training-set size, measured images/s, time estimates
    runner.py    run the cells (``--jobs``, ``--shard``), progress lines, skip/resume/lock
    cell.py      one cell in its own process (``python -m grid.cell``): train, evaluate, metrics.json
    report.py    results.csv, tables (Markdown, LaTeX) and figures (PNG) from the finished cells

A cell is finished when its ``metrics.json`` exists (written atomically after evaluation).
docs/reproduce.md describes the file format and the outputs.
"""
