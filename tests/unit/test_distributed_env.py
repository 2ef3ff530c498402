"""Who we are in a launch: torchrun's and SLURM's variables, read without creating a group."""

import torch

from tarflow.app import distributed as D


def test_one_process_without_launcher(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    world = D.world_from_env()
    assert (world.rank, world.size, world.is_main, world.distributed) == (0, 1, True, False)
    assert D.setup(world) == world  # no group for one process
    t = torch.tensor([1.5], dtype=torch.float32)
    assert D.all_sum(t).dtype == torch.float64 and D.broadcast("x") == "x"
    assert D.any_failed(True) and not D.any_failed(False)


def test_torchrun_variables_win_over_slurm(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "5")
    assert D.world_from_env() == D.World(3, 4, 1)


def test_slurm_variables(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_PROCID", "9")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert D.world_from_env() == D.World(9, 16, 1)


def test_first_host_of_a_slurm_node_list():
    assert D._first_slurm_host("gpu[03-05,09],cpu1") == "gpu03"
    assert D._first_slurm_host("node7") == "node7"
    assert D._first_slurm_host("a[1,4]") == "a1"
