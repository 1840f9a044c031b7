"""Run one experiment from Python: python examples/run_exp.py"""
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
try:
    import exp
except ImportError:  # running from a checkout of exp: use the exp.py one level up
    sys.path.insert(0, os.path.dirname(here))
    import exp

e = exp.Experiment(
    name="single",
    command=f"{sys.executable} train.py --steps 10",
    base_dir=os.path.join(here, "results"),
    cwd=here,
    tags=["example"],
    description="one run of the toy trainer",
)
code = e.run()  # streams the output here and waits
print(f"exit code {code}, status {e.status}, directory {e.work_dir}")
print("last row:", e.metrics()[-1])
sys.exit(code)
