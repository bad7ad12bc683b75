"""Evaluation: how well a policy does on the simulated task.

- `rollout.py`   the paper's protocol: vectorised rollouts on the test seeds, every chunk awaited.
- `realtime.py`  the wall-clock mode: robots paced at the control rate, inference in the background.
- `metrics.py`   per-episode results -> mean score, success rate and their 95% intervals.
- `offline.py`   without a simulator: loss and action MSE on held-out demonstrations, replays.
- `checkpoint_eval.py`  what `dp eval` calls: options checked up front, a checkpoint loaded,
  one of the modes run, results written where checkpoint pruning never reaches.
- `report.py`    what `dp report` calls: a run directory (read by `run_log.py`) drawn as one PNG.
"""
