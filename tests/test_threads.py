"""Parallelism follows the free CPUs; a cell's own thread count stays fixed (reproducible numbers)."""
import os

from fl_core.threads import parallel_cells, usable_cpus


def test_parallel_cells_follow_the_free_cpus(capsys):
    usable = usable_cpus()
    assert parallel_cells(100, busy=0.0) == usable
    assert parallel_cells(1, busy=0.0) == 1
    assert parallel_cells(100, threads_per_cell=usable, busy=0.0) == 1
    assert parallel_cells(100, busy=max(0.0, usable - 1.0)) == 1
    assert capsys.readouterr().err == ""
    assert parallel_cells(100, busy=usable + 1.0) == 1
    assert "busy with other work" in capsys.readouterr().err


def test_openmp_waits_passively_unless_the_user_chose():
    import fl_core  # noqa: F401

    assert os.environ.get("OMP_WAIT_POLICY")  # PASSIVE by default (a user's value is kept)
