"""torchrun infer.py (gloo, on the CPU) goes on from a sweep a kill stopped: the ranks make only the batches
the work folder lacks, and rank 0 writes the folder one uninterrupted process writes.

Same conditions as test_sharded_eval (whose launch helpers this uses): one thread in this process, as in
torchrun's ranks, so the images are compared byte for byte.
"""
from __future__ import annotations

import pytest

import infer
from interruptions import stop_pipeline_after
from test_sharded_eval import folder_bytes, infer_argv, spy, two_processes  # noqa: F401 (spy: a fixture)
from test_training_losses import one_thread  # noqa: F401 (autouse fixture)


def test_two_ranks_finish_a_sweep_one_process_began(tmp_path, spy, monkeypatch):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    infer.main(infer_argv(whole))
    assert len(spy) == 5  # batches of 2, 2, 2, 2 and 1 cell
    left = spy[2:]

    with monkeypatch.context() as patch:
        stop_pipeline_after(patch, 2)  # killed after two batches (4 of the 9 cells)
        with pytest.raises(KeyboardInterrupt):
            infer.main(infer_argv(resumed))
    assert not resumed.exists()

    calls = two_processes(tmp_path, "infer.py", infer_argv(resumed))
    assert calls == {0: left[0::2], 1: left[1::2]}  # the 3 batches left, each made once, batched as before
    assert folder_bytes(resumed) == folder_bytes(whole)
    assert not (tmp_path / ".resumed.partial").exists()
