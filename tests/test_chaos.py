"""The chaos test's fast variant: SIGKILL at random moments, restart until done."""

from dlkit import chaos


def test_chaos_quick(tmp_path):
    summary = chaos.run_chaos(2, steps=400, kills=2, seed=1, base=tmp_path)
    assert summary["resumed_from_newest_valid"] == 2
    assert sum(summary["kills"].values()) >= 2  # the kills landed while training was under way
    assert summary["resume_checks"] >= 2
    assert summary["final_params_identical"] == 2
    assert summary["leftovers"] == 0


def test_chaos_two_writers_case(tmp_path):
    """The one fault case that needs two real processes; the others are tested in-process
    (tests/test_workdir.py, test_metrics.py, test_reliability.py, test_bad_input.py)."""
    from dlkit import chaos_cases

    summary = chaos_cases.run_cases(tmp_path, only=["two_writers"])
    assert summary == {"two_writers": [1, 1]}
