"""The demo behind ``make demo``: train a small DCDH model and evaluate it, as a user would.

Uses the real faces of ``../shared/data/celeba299-ddh32`` when that folder exists (a
development checkout), else writes a small synthetic DDH-layout set under ``demo_out/``.
Runs the two user commands (``dcdh_train.py`` then ``evaluation.py``) as subprocesses.
"""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REAL = os.path.join(os.path.dirname(HERE), "shared", "data", "celeba299-ddh32")
OUT = os.path.join(HERE, "demo_out")


def run(cmd):
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run([sys.executable] + cmd, cwd=HERE, check=True)


def main():
    os.makedirs(OUT, exist_ok=True)
    if os.path.isdir(REAL):
        root, epochs = REAL, 3
        print(f"demo: real faces from {REAL} (CelebA, 299 identities, 32x32, DDH layout)")
    else:
        sys.path.insert(0, HERE)
        from data.synthetic import write_synthetic_ddh
        root, epochs = write_synthetic_ddh(os.path.join(OUT, "synthetic"), identities=30,
                                           train_per_id=40, test_per_id=5), 5
        print(f"demo: {REAL} not found; using a small SYNTHETIC set written to {root} "
              "(30 identities; figures are not comparable with real faces)")
    model = os.path.join(OUT, "demo12.tar")
    run(["dcdh_train.py", "--dataset", "ddh", "--data-root", root, "--len", "12", "--epochs", str(epochs),
         "--save", model, "--eval-every", "0", "--device", "cpu"])
    run(["evaluation.py", "--load", model, "--dataset", "ddh", "--data-root", root, "--device", "cpu",
         "--json", os.path.join(OUT, "demo12.json")])
    print(f"demo: done; checkpoint {model}, metrics {os.path.join(OUT, 'demo12.json')}")


if __name__ == "__main__":
    try:
        main()
    except subprocess.CalledProcessError as e:
        sys.exit(e.returncode)
