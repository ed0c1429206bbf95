"""Run the cells of a grid: skip finished ones, resume killed ones, N at once, one shard of many.

Each cell runs in its own process (``python -m grid.cell``, see ``grid/cell.py``) with its output
appended to ``<cell>/cell.out``. While it runs, its folder is locked (``<cell>/.lock``, an
``flock`` that the cell's process shares and holds until it ends, even if this runner is killed),
so a second runner on the same folder (a rerun, another shard, a job array on a shared file
system) leaves it alone. A failing cell is reported with the last line of its output and the
others go on. After every finished cell the report (``grid.report``) is rewritten.

A cell is finished when its ``metrics.json`` checks (``report.check_metrics``); an unusable one
is named in one line, set aside (``metrics.json.bad-N``, never deleted) and the cell runs again
(``grid.cell`` evaluates its checkpoint again when training had ended). ``check_data`` reads the
data as the trainer does, so bad data stops the grid before any folder is made.

A cell folder remembers the settings it was started with (``cell.json``); a run with other
settings is refused for a cell that has made progress (an epoch logged, a checkpoint, a
``metrics.json``), but a folder without progress (a cell that failed during its setup, before
its first epoch) is taken over by the new settings: nothing in it would be continued.
"""
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from utils.checkpoint import atomic_write, make_writable_folder
from utils.errors import UserInputError

from . import estimate, report
from .cell import set_aside

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _terminated(signum, frame):
    raise SystemExit(128 + signum)


def code_version(ignore=None, root=ROOT):
    """``git rev-parse --short HEAD`` of the checkout at ``root``, ``-dirty`` when a tracked file
    differs from HEAD (as ``git describe --dirty``: untracked files do not count), or ``unknown``
    outside git. ``ignore``, a folder (the experiment's output folder), is left out of the check:
    the runner rewrites the tables committed there, which is not a change of code."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=30)
        if head.returncode:
            return "unknown"
        spec = ["--", "."]
        if ignore:
            rel = os.path.relpath(os.path.abspath(ignore), root)
            if rel != "." and not rel.startswith(".."):
                spec.append(f":(exclude){rel}")
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"] + spec, cwd=root,
                               capture_output=True, text=True, timeout=60).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def lock(cell, tries=10, wait=0.2):
    """An fd holding the cell's lock, or None when another process holds it after ``tries``
    attempts ``wait`` seconds apart (another runner's ``status`` probe holds it for an instant)."""
    os.makedirs(cell.dir, exist_ok=True)
    fd = os.open(cell.path(".lock"), os.O_RDWR | os.O_CREAT, 0o666)
    for attempt in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if attempt + 1 < tries:
                time.sleep(wait)
    os.close(fd)
    return None


def locked_elsewhere(cell):
    """True when another process holds the cell's lock (a running cell). The probe opens the lock
    file read-only (results of another user or on a read-only mount can still be listed) and
    holds it for an instant only; False when it cannot be opened."""
    try:
        fd = os.open(cell.path(".lock"), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def status(cell, check_lock=True):
    """(``finished`` | ``running`` | ``partial`` | ``todo``, epochs done per the log).

    ``check_lock`` False: the caller holds the lock (a second flock would see it as taken).
    A cell is finished when its ``metrics.json`` is a finished cell's record
    (``report.check_metrics``); with an unusable one it is partial (or todo). Progress is a
    checkpoint: a cell whose log counts epochs but whose checkpoints are gone is todo (it trains
    from scratch, ``grid.cell.run``)."""
    if report.read_metrics(cell) is not None:
        return "finished", cell.epochs
    if check_lock and os.path.isfile(cell.path(".lock")) and locked_elsewhere(cell):
        return "running", estimate.read_log(cell.path("model.log"))[1]
    if not (os.path.isfile(cell.path("model.last.tar")) or os.path.isfile(cell.path("model.tar"))):
        return "todo", 0
    return "partial", estimate.read_log(cell.path("model.log"))[1]


def cell_spec(exp, cell):
    """The cell's cell.json: paths relative to the output folder, threads (``config.portable_spec``)."""
    from .config import portable_spec
    return portable_spec({"experiment": exp.name, "cell": cell.name, "method": cell.method, "bits": cell.bits,
                          "seed": cell.seed, "dataset": exp.dataset, "data_root": exp.data_root, "device": exp.device,
                          "train_flags": cell.train_flags, "eval_flags": cell.eval_flags, "settings": cell.settings},
                         exp.out_dir, cell.threads)


MACHINE_SETTINGS = ("amp",)
"""Settings left to the machine when one side says ``auto``: ``settings_conflict`` accepts a cell
started with ``amp = "on"`` under ``"auto"`` (and back), but refuses ``"on"`` against ``"off"``."""


def settings_conflict(cell, state):
    """The message refusing ``cell`` (whose status is ``state``) when its folder holds progress
    made with other settings (epochs, lr, method_args, ...); None when it may run. A folder
    without progress (``todo``: e.g. a cell that failed during setup) never conflicts."""
    if state == "todo":
        return None
    try:
        with open(cell.path("cell.json")) as f:
            old = json.load(f)["settings"]
        if not isinstance(old, dict):
            raise TypeError
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):  # progress, but its settings cannot be read
        return (f"{cell.dir}: this cell has progress but its cell.json cannot be read, so its settings are "
                "unknown; delete the folder to start it again")
    new = json.loads(json.dumps(cell.settings))
    # the precision (--amp auto/on/off) under auto is a choice of the machine: bf16 on one CPU and fp32
    # on another; each cell records the precision(s) it actually used (metrics.json, results.csv:
    # "bf16+fp32" for a cell resumed in another precision), so a change to or from auto keeps progress
    machine = [k for k in MACHINE_SETTINGS if "auto" in (old.get(k, "auto"), new.get(k, "auto"))]
    old, new = ({k: v for k, v in s.items() if k not in machine} for s in (old, new))
    if old == new:
        return None
    diff = ", ".join(f"{k} {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}"
                     for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
    return (f"{cell.dir}: this cell was started with other settings ({diff}); give the experiment another "
            "name (or --out), or delete the folder to start it again")


def check_settings(cells):
    """Refuse to continue cells started with other settings (``settings_conflict``)."""
    for cell in cells:
        if os.path.isfile(cell.path("cell.json")):
            message = settings_conflict(cell, status(cell)[0])
            if message:
                raise UserInputError(message)


def _folder_identities(root, split):
    """Identities of an image-folder split that hold image files, listed as ``data.folder.FaceFolder``
    lists them, decoding only until one image decodes (``check_some_decode``: a whole decode of a
    large set would make a dry run take minutes; an undecodable image is skipped by the trainer
    with a warning, a split of which none decodes stops every cell).
    Raises: UserInputError with FaceFolder's message for a missing or empty split."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise UserInputError(f"{folder}: no such folder (an image-folder dataset needs "
                             f"{split}/<identity>/<images>)")
    try:
        classes, index = find_classes(folder)
        samples = make_dataset(folder, index, extensions=IMG_EXTENSIONS, allow_empty=True)
    except FileNotFoundError as e:
        raise UserInputError(f"{folder}: {e}") from None
    except OSError as e:
        raise UserInputError(f"{folder}: cannot be listed ({e.strerror or e})") from None
    if not samples:
        raise UserInputError(f"{folder}: no images found (expected {split}/<identity>/*.jpg|png|pgm...)")
    check_some_decode(folder, [path for path, _ in samples])  # one decode when the first image is sound
    return {classes[target] for _, target in samples}


def check_some_decode(folder, paths):
    """At least one of ``paths`` (a split's image files, listed in identity order) must decode as
    the trainer decodes them (``data.folder.decodable``): the first image of each identity is tried
    first, then the others, stopping at the first that decodes (one decode for a sound folder).
    Raises: UserInputError naming ``folder`` when none decodes (every cell would fail on it), or
    ``decodable``'s line for a decompression bomb."""
    from data.folder import decodable
    firsts = {}
    for path in paths:
        firsts.setdefault(os.path.dirname(path), path)
    seen = set(firsts.values())
    for path in list(firsts.values()) + [p for p in paths if p not in seen]:
        if decodable(path):
            return
    raise UserInputError(f"{folder}: none of its {len(paths)} image files can be decoded (e.g. {paths[0]}); "
                         "expected JPEG, PNG, PGM ... images")


def check_data(exp):
    """Check the data folder's contents as dcdh_train.py does before its first epoch, so that a
    data problem stops the grid (one line, exit 2) before any folder is made rather than failing
    every cell. DDH-layout sets are read as the trainer reads them (``data.build_datasets``: an
    empty split, a corrupt or foreign ``.pkl``, a folder named ``*.pkl``); image folders are
    listed, and decoded until one image decodes (``_folder_identities``). Sets ``exp.train_images`` when it was not counted.

    Raises: UserInputError with the trainer's message (naming the folder or file).
    """
    from data import DDH_LAYOUT, build_datasets
    if exp.dataset in DDH_LAYOUT:
        database, _, label_map = build_datasets(exp.dataset, exp.data_root)
        identities = len(label_map)
        exp.train_images = exp.train_images or len(database)
    else:
        identities = len(_folder_identities(exp.data_root, "train"))
        _folder_identities(exp.data_root, "test")
    if identities < 2:  # dcdh_train.py's own check and message
        raise UserInputError(f"the training split has {identities} identity; hashing needs at least 2")


def make_out_dir(exp, key, create=True):
    """Create the experiment's output folder (``key``: ``--out`` or the file's ``out``, for the
    message); ``create`` False (``--dry-run``) only checks that it could be. Raises:
    UserInputError, one line, when it cannot be created or written."""
    folder = exp.out_dir
    make_writable_folder(folder, f"{key}: cannot create the output folder {folder}",
                         f"{key}: cannot write the output folder {folder}", create=create)


def display(path):
    """``path`` relative to the current folder when inside it, else absolute."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def last_line(path):
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 4000))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
        return lines[-1] if lines else "(no output)"
    except OSError:
        return "(no output)"


class Runner:
    """Run ``cells`` of ``exp``, ``jobs`` at once; ``say`` prints a line."""

    def __init__(self, exp, cells, jobs=1, say=print):
        self.exp, self.cells, self.jobs = exp, cells, jobs
        self.version = code_version(ignore=exp.out_dir if exp is not None else None)
        self._lock = threading.Lock()
        self._say, self.procs, self.stop = say, set(), False
        self.finished, self.failed, self.elsewhere, self.trained = 0, [], [], 0
        self.durations, self.estimates = [], {}
        self.estimated = []  # each entry of durations: (the cell's method, its estimate beforehand or None)
        self.active = set()  # names of the cells running now (their count is the progress line's)
        self._pending = []  # cells not finished yet (set by run)
        self.resumed = set()  # cells continued from an earlier run: their time is not a whole cell's

    def say(self, line):
        with self._lock:
            self._say(line)

    def env(self):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.jobs > 1 and "OMP_NUM_THREADS" not in env and estimate.device_type(self.exp) == "cpu":
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.jobs))  # share the cores
        return env

    def progress(self):
        total = len(self.cells)
        running = len(self.active)
        left = total - self.finished - len(self.failed) - running - len(self.elsewhere)
        eta = self.time_left(left)
        failed = f", {len(self.failed)} failed" if self.failed else ""
        return (f"[{self.finished}/{total} done, {running} running, {left} left{failed}; "
                f"about {estimate.format_duration(eta)} left]")

    def time_left(self, left):
        """Seconds until the grid ends (None when unknown), ``left`` cells not started yet.

        Each unfinished cell counts its estimate (from measured images/s; half of it while it
        runs), scaled by how long the finished cells of its method took against their own
        estimates (unscaled until one has finished: another method's network may be much faster), so
        a grid mixing short and long methods is not judged by its last cell; spread over ``jobs`` but
        never below the longest unfinished cell.
        Without an estimate for every cell: the mean finished cell times the cells left."""
        pending = self._pending  # read once: the main thread replaces the list when a cell ends
        weights = [(self.estimates.get(c.name), 0.5 if c.name in self.active else 1.0) for c in pending]
        if weights and all(e is not None for e, _ in weights):
            sums = {}  # method -> [measured, estimated] seconds of its finished cells
            for d, (m, e) in zip(self.durations, self.estimated):
                if e:
                    sums.setdefault(m, [0.0, 0.0])
                    sums[m][0] += d
                    sums[m][1] += e
            ratio = {m: d / e for m, (d, e) in sums.items()}
            remaining = [e * w * ratio.get(c.method, 1.0) for c, (e, w) in zip(pending, weights)]
            # spread over the jobs, but never shorter than the longest cell still to end
            return max(sum(remaining) / self.jobs, max(remaining))
        if self.durations:
            return sum(self.durations) / len(self.durations) * (left + 0.5 * len(self.active)) / self.jobs
        return None

    def run_cell(self, cell):
        """Run one cell in its own process; returns (cell, outcome, seconds, message)."""
        if self.stop:
            return cell, "cancelled", 0.0, ""
        try:
            fd = lock(cell)
        except OSError as e:
            return cell, "failed", 0.0, f"cannot write its folder {cell.dir}: {e.strerror or e}"
        if fd is None:
            return cell, "elsewhere", 0.0, "its folder is locked by another running process"
        try:
            metrics, problem = report.check_metrics(cell)
            if metrics is not None:
                return cell, "finished-before", 0.0, ""
            if problem and problem.startswith("cannot be read"):  # permissions, I/O: not the file's fault
                return cell, "failed", 0.0, f"{cell.path('metrics.json')}: {problem}"
            if problem:  # not a finished cell's record: kept under another name, the cell runs again
                try:
                    kept = set_aside(cell.path("metrics.json"), "bad")
                except OSError as e:
                    return cell, "failed", 0.0, (f"cannot set aside its unusable {cell.path('metrics.json')}: "
                                                 f"{e.strerror or e}")
                self.say(f"{cell.name}: its unusable metrics.json is set aside as {os.path.basename(kept)}")
            state, done = status(cell, check_lock=False)
            conflict = settings_conflict(cell, state)  # another runner may have started it meanwhile
            if conflict:
                return cell, "failed", 0.0, conflict
            spec = cell_spec(self.exp, cell)
            try:
                atomic_write(cell.path("cell.json"), lambda f: f.write(json.dumps(spec, indent=2).encode()))
            except OSError as e:
                return cell, "failed", 0.0, f"cannot write {cell.path('cell.json')}: {e.strerror or e}"
            with self._lock:
                self.active.add(cell.name)
            if state == "partial":
                with self._lock:
                    self.resumed.add(cell.name)
            what = (f"resuming after epoch {done}/{cell.epochs}" if state == "partial"
                    else f"{cell.epochs} epoch{'s' if cell.epochs != 1 else ''}")
            logged = estimate.read_log(cell.path("model.log"))[1] if state == "todo" else 0
            if logged:
                what += f", from scratch: no checkpoint is left of the {logged} epoch(s) its model.log records"
            self.say(f"{self.progress()} start {cell.name} ({what}); output in {display(cell.path('cell.out'))}")
            start = time.time()
            with open(cell.path("cell.out"), "ab") as out:
                proc = subprocess.Popen([sys.executable, "-m", "grid.cell", cell.dir, self.version], cwd=ROOT,
                                        stdout=out, stderr=subprocess.STDOUT, pass_fds=(fd,), env=self.env())
                with self._lock:
                    self.procs.add(proc)
                rc = proc.wait()
                with self._lock:
                    self.procs.discard(proc)
            seconds = time.time() - start
            with self._lock:
                self.active.discard(cell.name)
            if rc == 0:  # finished only with a finished cell's record, as everywhere else (check_metrics)
                metrics, problem = report.check_metrics(cell)
                if metrics is not None:
                    return cell, "finished", seconds, ""
                return cell, "failed", seconds, f"{cell.path('metrics.json')}: {problem or 'not written'}"
            return cell, "failed", seconds, f"exit status {rc}: {last_line(cell.path('cell.out'))}"
        finally:
            os.close(fd)

    def run(self, estimates=None):
        """Run every cell not finished yet; returns the number of failed cells."""
        self.estimates = estimates or {}
        states = {c.name: status(c)[0] for c in self.cells}
        self.finished = sum(s == "finished" for s in states.values())
        self._pending = [c for c in self.cells if states[c.name] != "finished"]
        if not self._pending:
            self.say(f"{self.exp.name}: nothing to run: all {len(self.cells)} cells are finished")
            self.write_report()
            return 0
        for cell in self._pending:  # named once; run_cell sets the file aside and runs the cell again
            problem = report.check_metrics(cell)[1]
            if problem:
                self.say(report.bad_metrics_line(cell, problem))
        pool = ThreadPoolExecutor(max_workers=self.jobs)
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _terminated) if main else None  # kill -TERM stops the cells too
        try:
            futures = [pool.submit(self.run_cell, c) for c in self._pending]  # started in this order
            while futures:
                done, pending = wait(futures, return_when=FIRST_COMPLETED)
                futures = [f for f in futures if f in pending]
                for fut in done:
                    self.record(*fut.result())
        except BaseException:
            self.stop = True
            with self._lock:
                running = list(self.procs)
                for proc in running:
                    proc.terminate()  # the cells resume from their last epoch next time
            self._say(f"{self.exp.name}: stopped; {len(running)} running cell(s) ended; "
                      "the same command resumes them")
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)
        pool.shutdown(wait=True)
        self.summary()
        return len(self.failed)

    def record(self, cell, outcome, seconds, message):
        self._pending = [c for c in self._pending if c is not cell]
        if outcome == "finished":
            self.finished += 1
            self.trained += 1
            if cell.name not in self.resumed:  # the time-left estimate averages whole cells only
                self.durations.append(seconds)
                self.estimated.append((cell.method, self.estimates.get(cell.name)))
            m = report.read_metrics(cell)
            figures = (f": mAP {100 * m['metrics']['map']:.2f}%, precision/recall within radius 2 "
                       f"{100 * m['metrics']['precision_radius_2']:.2f}%/{100 * m['metrics']['recall_radius_2']:.2f}%, "
                       f"best of {m['epochs_run']} epoch{'s' if m['epochs_run'] != 1 else ''} at epoch "
                       f"{m['best_epoch']}") if m else ""
            self.say(f"{self.progress()} finished {cell.name} in {estimate.format_duration(seconds)}{figures}")
            self.write_report()
        elif outcome == "finished-before":
            self.finished += 1
        elif outcome == "failed":
            self.failed.append((cell, message))
            self.say(f"{self.progress()} FAILED {cell.name} ({message}); see {display(cell.path('cell.out'))}")
        elif outcome == "elsewhere":
            self.elsewhere.append(cell)
            self.say(f"{self.progress()} skipped {cell.name}: {message}")

    def write_report(self):
        try:
            paths = report.write_report(self.exp)
        except Exception as e:  # a figure must never stop the grid
            self.say(f"warning: the report could not be written ({type(e).__name__}: {e})")
            return []
        return paths

    def summary(self):
        """The closing lines; they name results.csv only when it exists (no cell finished: none)."""
        csv_path = os.path.join(self.exp.out_dir, "results.csv")
        where = (f"results in {display(csv_path)}" if os.path.isfile(csv_path)
                 else "no report written (no finished cell)")
        self.say(f"{self.exp.name}: {self.trained} cell(s) run, {len(self.failed)} failed, "
                 f"{len(self.elsewhere)} running elsewhere, {self.finished} of {len(self.cells)} finished; {where}")
        for cell, message in self.failed:
            self.say(f"  failed: {cell.name}: {message} (rerun the same command to retry it)")


def plan(exp, cells, jobs=1, shard=None):
    """The dry-run listing of ``cells`` and each unfinished cell's estimated seconds (or None).

    Returns: (list of lines, {cell name: seconds or None}).
    """
    n_images = exp.train_images or estimate.count_train_images(exp.dataset, exp.data_root)
    trained = estimate.count_trained_images(exp)  # {seed: images} when identities are held out
    speeds, dev = estimate.measured(exp), estimate.device_type(exp)
    grid = (f"{len(exp.methods)} method(s) x {len(exp.bits)} code length(s) x {len(exp.seeds)} seed(s) "
            f"= {len(exp.cells)} cells")
    lines = [f"{exp.name}: {grid}" + (f"; shard {shard[0]}/{shard[1]}: {len(cells)} of them" if shard else "")
             + f" -> {display(exp.out_dir)}",
             f"data: {exp.dataset} in {exp.data_root}, "
             + (f"{n_images:,} training images" if n_images else "training images not counted")
             + (f" ({' or '.join(f'{n:,}' for n in sorted(set(trained.values())))} once the "
                f"{exp.unseen_identities} held-out identities are left out)" if trained else "")
             + f"; device {exp.device or dev}",
             f"{'cell':<22} {'status':<22} {'epochs':>6}  {'images/s':<24} estimate"]
    estimates, total, unknown, counts = {}, 0.0, 0, {}
    for cell in cells:
        state, done = status(cell)
        counts[state] = counts.get(state, 0) + 1
        ips, source = estimate.cell_speed(cell, speeds, dev)
        shown = {"finished": "finished", "running": f"running (epoch {done})", "todo": "to train",
                 "partial": f"to resume (epoch {done})"}[state]
        if state == "finished":
            seconds = 0.0
        else:
            seconds, _ = estimate.cell_estimate(cell, trained.get(cell.seed, n_images), speeds, dev, done)
            estimates[cell.name] = seconds
            if state != "running":
                total, unknown = (total + seconds, unknown) if seconds is not None else (total, unknown + 1)
        speed = f"{ips:.0f} ({source})" if ips else source
        lines.append(f"{cell.name:<22} {shown:<22} {cell.epochs:>6}  {speed:<24} "
                     + ("-" if state == "finished" else estimate.format_duration(seconds)))
    lines += [report.bad_metrics_line(cell, problem) for cell in cells
              for problem in [report.check_metrics(cell)[1]] if problem]
    to_run = counts.get("todo", 0) + counts.get("partial", 0)
    eval_note = ("evaluation at its measured time" if speeds.get("eval_s") is not None
                 else f"start-up and evaluation {estimate.OVERHEAD_S:.0f} s a cell until a cell has finished")
    when = f"about {estimate.format_duration(total / jobs)} with {jobs} at once"
    if unknown:
        when = (f"unknown for {unknown} cell(s) (no measured or default speed for their network and device: "
                "run one cell first)" + (f"; the others {when}" if total else ""))
    lines.append(f"total: {to_run} cell(s) to run ({counts.get('finished', 0)} finished, "
                 f"{counts.get('running', 0)} running elsewhere): {when}. Estimates are training images x "
                 f"epochs / images/s, {eval_note}; early stopping can end a cell sooner.")
    return lines, estimates
