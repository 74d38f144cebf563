"""Run in a pseudo-terminal by tests/test_terminal.py: a progress bar (console.Progress) with
every kind of writer printing while it is open: a stage line on stdout, a Python warning, a
logged warning, and a worker's line forwarded by Ray's own code from another thread (as Ray's
log thread does), then the bar stops early and a second bar runs to its end."""
import logging
import sys
import threading
import warnings

from ray._private.worker import print_to_stdstream

from pipeline import console

logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")  # a handler made before the bar
console.configure(console.NORMAL)
progress = console.Progress(50, "writers phase 1", "evaluation")
for done in range(1, 21):
    progress.update(done, best_val=0.5)
print("writers: a stage line on stdout")
warnings.warn("a python warning")
logging.getLogger("pipeline.writers").warning("a logged warning")
forwarded = {"is_err": False, "pid": 4242, "ip": "10.0.0.1", "localhost": "10.0.0.1",
             "lines": ["a line a worker printed"]}
thread = threading.Thread(target=print_to_stdstream, args=(forwarded, False))
thread.start()
thread.join()
print("writers: a partial", end="")
sys.stdout.write(" line ended later\n")
for done in range(21, 31):
    progress.update(done, best_val=0.6)
progress.close("stopped early: 20 evaluations not needed")
second = console.Progress(7, "writers phase 2", "evaluation")
second.update(7)
second.close()
print("writers: done")
