"""The one training loop for every policy.

build.py (the run: data, learner, length), step.py (one optimiser step, eager or CUDA-graphed),
checkpointer.py (save, prune, keep-best, restore), run_dir.py (run-directory rules), loop.py
(`train()`), graph.py (the CUDA-graph capture) and distill.py (`dp distill`, through `train()`).
"""
