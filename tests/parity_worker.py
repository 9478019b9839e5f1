"""Runs several training cases in one torchrun launch (start-up dominates on
a small CPU machine): ``python -m torch.distributed.run ... parity_worker.py CASES.json``.

CASES.json: [{"config": path, "overrides": [...], "run_dir": path}, ...].
Each case trains with the real Trainer on the one process group, writing its
run directory as ``scaletrain train`` would."""

import json
import os
import sys
import traceback
from pathlib import Path

from scaletrain.config import load_config
from scaletrain.parallel.runtime import init_runtime, shutdown
from scaletrain.train.trainer import Trainer


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    runtime = init_runtime()
    code = 0
    try:
        for case in cases:
            cfg = load_config(case["config"], case["overrides"])
            run_dir = Path(case["run_dir"])
            if runtime.is_main:
                run_dir.mkdir(parents=True, exist_ok=True)
            runtime.barrier()
            Trainer(cfg, run_dir, runtime, show_progress=False).fit(show_progress=False)
            runtime.barrier()
    except Exception:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    if code == 0:
        shutdown(runtime)
    os._exit(code)  # see scaletrain.train.launch.run_worker: gloo may abort at interpreter exit


if __name__ == "__main__":
    main()
