"""Where the seed workload W's time goes: the public ``simulate()`` in a fresh process.

Prints one JSON object of seconds: ``import_torch``, ``import_fedtorrent`` (the library and the
``simulate`` command's module), ``data``, ``training``, ``mixing``, ``evaluation``,
``rest_of_run`` (records, scores, traffic counts inside the run) and ``writing`` (the run folder's
summary), with torch's default threads as ``fedtorrent simulate``. ``benchmarks/sim_speed.py``
runs it.

    FEDTORRENT_DATA=../shared/data .venv/bin/python benchmarks/w_phases.py
"""

import time

start = time.perf_counter()
import torch  # noqa: E402, F401  (timed alone: the floor of any torch tool)

torch_done = time.perf_counter()
import json  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import fedtorrent as ft  # noqa: E402
import fedtorrent.cli.sim  # noqa: E402  (what the command imports besides)
from fedtorrent.sim.run import load_for  # noqa: E402

imported = time.perf_counter()
config = ft.SimConfig(
    data=ft.DataConfig(dataset="mnist", num_nodes=6, val_fraction=0.0),
    train=ft.TrainConfig(lr=0.1, batch_size=64),
    mixing=ft.MixingConfig(rule="fixed"),
    rounds=10,
    round_schedule="constant",
    seed=0,
)
data = load_for(config)
loaded = time.perf_counter()
with tempfile.TemporaryDirectory() as tmp:
    (outcome,), _ = ft.simulate(
        config, dataset=data, out_dir=Path(tmp), plots=False, progress=False
    )
    done = time.perf_counter()
timings = outcome.timings
print(
    json.dumps(
        {
            "import_torch": torch_done - start,
            "import_fedtorrent": imported - torch_done,
            "data": loaded - imported,
            "training": timings["train"],
            "mixing": timings["mix"] + timings["trust"],
            "evaluation": timings["evaluate"],
            "rest_of_run": outcome.wall_seconds - sum(timings.values()),
            "writing": done - loaded - outcome.wall_seconds,
        }
    )
)
