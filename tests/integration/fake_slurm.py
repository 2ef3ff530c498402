"""A fake SLURM for the ``hydra/launcher=slurm`` test: ``sbatch``, ``srun`` and ``sacct``
executables that run submitit's job script on this machine as the first task of a job of
``--nodes`` x ``--ntasks-per-node`` tasks (the SLURM variables say so; only task 0 runs, so no
process group ever forms), and a strategy that records what the Lightning trainer computed from
them and stops before the process group would wait for the other ranks."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

from lightning.pytorch.strategies import DDPStrategy

JOB_ID = "4242"
PROBE_ENV = "TARFLOW_TEST_WORLD_PROBE"
LOG_ENV = "TARFLOW_TEST_FAKE_SLURM_LOG"

# sbatch: the job's SLURM variables from the script's #SBATCH lines; the job runs in the
# background once submitit has moved its pickled submission to where the job looks for it.
SBATCH = r'''
import os, re, subprocess, sys, time
from pathlib import Path
script = Path(sys.argv[-1])
text = script.read_text()
opts = dict(re.findall(r"^#SBATCH --([\w-]+)=(.*)$", text, re.M))
nodes, tasks = int(opts.get("nodes", 1)), int(opts.get("ntasks-per-node", 1))
job = "{job}"
array = {"SLURM_ARRAY_JOB_ID": job, "SLURM_ARRAY_TASK_ID": "0"} if "array" in opts else {}
env = dict(os.environ, SLURM_JOB_ID=job, **array,
           SLURM_NNODES=str(nodes), SLURM_JOB_NUM_NODES=str(nodes),
           SLURM_NTASKS_PER_NODE=str(tasks), SLURM_NTASKS=str(nodes * tasks),
           SLURM_JOB_NAME=opts.get("job-name", "job"), SLURM_JOB_NODELIST="node[1-%d]" % nodes,
           SLURM_NODEID="0", SLURM_PROCID="0", SLURM_LOCALID="0")
with open(os.environ["{log}"], "a") as log:
    log.write("sbatch " + " ".join("--%s=%s" % kv for kv in sorted(opts.items())) + "\n")
name = job + "_0" if array else job  # submitit's job id: <array id>_<index> in an array
folder = Path(opts["output"].replace("%A", job).replace("%a", "0").replace("%j", job)).parent
pickle = folder / (name + "_submitted.pkl")
runner = ("import subprocess, sys, time; from pathlib import Path\n"
          "p = Path(sys.argv[1])\n"
          "for _ in range(300):\n"
          "    if p.exists(): break\n"
          "    time.sleep(0.1)\n"
          "subprocess.run(['bash', sys.argv[2]])\n")
subprocess.Popen([sys.executable, "-c", runner, str(pickle), str(script)], env=env,
                 start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)  # submitit reads sbatch's output to its end
print("Submitted batch job " + job)
'''

# srun: task 0 only, its output where submitit asked for it; its arguments are logged.
SRUN = r'''
import os, shutil, subprocess, sys
args, out, err, i = sys.argv[1:], None, None, 0
with open(os.environ["{log}"], "a") as log:
    log.write("srun " + " ".join(args) + "\n")
while i < len(args) and args[i].startswith("-"):
    if args[i] in ("--output", "--error"):
        path = args[i + 1]
        for key, var in (("%A", "SLURM_ARRAY_JOB_ID"), ("%a", "SLURM_ARRAY_TASK_ID"),
                         ("%j", "SLURM_JOB_ID")):
            path = path.replace(key, os.environ.get(var, ""))
        path = path.replace("%t", "0")  # task 0: the only one that runs
        out, err = (path, err) if args[i] == "--output" else (out, path)
        i += 2
    else:
        i += 1
with open(out, "a") as o, open(err or out, "a") as e:
    code = subprocess.run(args[i:], stdout=o, stderr=e).returncode
# The other tasks never ran: task 0's result stands in for theirs (submitit waits for all).
first = out.replace("_log.out", "_result.pkl")
if os.path.exists(first):
    for task in range(1, int(os.environ["SLURM_NTASKS"])):
        shutil.copy(first, first.replace("_0_result.pkl", "_%d_result.pkl" % task))
sys.exit(code)
'''


def install(bin_dir: Path) -> Path:
    """Write ``sbatch``, ``srun`` and ``sacct`` into ``bin_dir``; returns it."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    scripts = {"sbatch": SBATCH.replace("{job}", JOB_ID).replace("{log}", LOG_ENV),
               "srun": SRUN.replace("{log}", LOG_ENV),
               "sacct": "import sys\n"}  # no accounting: submitit waits for the result file
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{body}")
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bin_dir


class WorldProbe(DDPStrategy):
    """DDP that writes the world it computed (``$TARFLOW_TEST_WORLD_PROBE``) and stops where the
    process group would be formed."""

    def setup_environment(self) -> None:
        env = self.cluster_environment
        record = {"world_size": self.world_size, "global_rank": self.global_rank,
                  "local_rank": self.local_rank, "node_rank": self.node_rank,
                  "num_nodes": self.num_nodes, "num_processes": self.num_processes,
                  "cluster_environment": type(env).__name__,
                  "auto_requeue": getattr(env, "auto_requeue", None)}
        Path(os.environ[PROBE_ENV]).write_text(json.dumps(record))
        raise RuntimeError("world probe: stopped before the process group")
