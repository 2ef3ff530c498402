"""Start-up cost of tarflow-train's issue-22 checks on the demo config, in one process,
round-robin (median of 7): the type check's second composition (the config without the value
overrides) and the probe Trainer built with the run's callbacks, next to one plain composition.

    python scripts/bench_startup_checks.py
"""

import statistics
import time

from hydra import compose, initialize_config_dir

from tarflow.app.checks.config_types import check_value_types
from tarflow.app.checks.startup import probe_trainer
from tarflow.cli.train import configured_callbacks
from tarflow.conf import CONFIG_DIR

PATHS = ["paths.root_dir=/tmp/bench_startup", "paths.output_dir=/tmp/bench_startup/run"]

with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
    cfg = compose("train", overrides=[*PATHS, "trainer.max_epochs=3"])
    times: dict[str, list[float]] = {"compose defaults + type check": [],
                                     "probe Trainer (demo callbacks)": [],
                                     "one composition (reference)": []}
    for _ in range(7):
        t = time.perf_counter()
        check_value_types(cfg, compose("train", overrides=PATHS))
        times["compose defaults + type check"].append(time.perf_counter() - t)
        t = time.perf_counter()
        probe_trainer(cfg, lambda: configured_callbacks(cfg))
        times["probe Trainer (demo callbacks)"].append(time.perf_counter() - t)
        t = time.perf_counter()
        compose("train", overrides=[*PATHS, "trainer.max_epochs=3"])
        times["one composition (reference)"].append(time.perf_counter() - t)
for name, values in times.items():
    print(f"{name}: median {statistics.median(values) * 1e3:.0f} ms")
