"""Benchmark Push-T env steps/s for every obs_type, single and vectorised, against gym-pusht side by side.

    .venv/bin/python scripts/bench_env.py                 # ours, plus gym-pusht if its venv can be made
    .venv/bin/python scripts/bench_env.py --no-theirs     # ours only

gym-pusht needs pymunk < 7, so it cannot share our venv: it is installed into its own venv (default
.bench/gym-pusht/.venv, ignored by git through the `.venv/` pattern) and measured in a subprocess that imports
only gym_pusht. Both sides step the same seeded random target positions and reset on termination.
Their "keypoints" counterpart is obs_type "environment_state_agent_pos" (block keypoints + agent position).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OBS_TYPES = ("state", "keypoints", "pixels", "pixels_agent_pos")
THEIR_OBS = {"keypoints": "environment_state_agent_pos"}


def make_env_fn(impl: str, obs_type: str):
    """A picklable env factory for `impl` ("ours" or "gym_pusht")."""

    def make():
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
        if impl == "ours":
            from envs.pusht import PushTEnv

            return PushTEnv(obs_type=obs_type, render_mode="rgb_array")
        import gym_pusht  # noqa: F401  (registers gym_pusht/PushT-v0)
        import gymnasium as gym

        return gym.make(
            "gym_pusht/PushT-v0",
            obs_type=THEIR_OBS.get(obs_type, obs_type),
            render_mode="rgb_array",
        ).unwrapped

    return make


def bench_single(impl: str, obs_type: str, steps: int) -> float:
    """Env steps/s of one env stepping seeded random targets (resets excluded from nothing: they count)."""
    import numpy as np

    env = make_env_fn(impl, obs_type)()
    actions = np.random.default_rng(0).uniform(0, 512, size=(steps + 20, 2))
    env.reset(seed=0)
    for a in actions[:20]:  # warm-up: lazy surfaces, caches
        env.step(a)
    t0 = time.perf_counter()
    for a in actions[20:]:
        _, _, terminated, truncated, _ = env.step(a)
        if terminated or truncated:
            env.reset()
    rate = steps / (time.perf_counter() - t0)
    env.close()
    return rate


def bench_vector(impl: str, obs_type: str, n_envs: int, steps: int) -> float:
    """Total env steps/s through gymnasium's AsyncVectorEnv (one process per env)."""
    import gymnasium as gym
    import numpy as np

    venv = gym.vector.AsyncVectorEnv([make_env_fn(impl, obs_type) for _ in range(n_envs)])
    actions = np.random.default_rng(0).uniform(0, 512, size=(steps + 5, n_envs, 2))
    venv.reset(seed=list(range(n_envs)))
    for a in actions[:5]:
        venv.step(a)
    t0 = time.perf_counter()
    for a in actions[5:]:
        venv.step(a)  # autoreset handles terminations
    rate = steps * n_envs / (time.perf_counter() - t0)
    venv.close()
    return rate


def run_worker(
    impl: str, steps: int, pixel_steps: int, vec_sizes: list[int], repeats: int = 3
) -> dict[str, float]:
    """All measurements for one implementation, keyed 'obs_type/n' (n = 1 for the single env).

    Each number is the best of `repeats` runs: on a shared machine the best run is the least disturbed one.
    """
    if impl == "ours":
        sys.path.insert(0, str(REPO))
    out: dict[str, float] = {}
    for obs_type in OBS_TYPES:
        n_steps = pixel_steps if obs_type.startswith("pixels") else steps
        out[f"{obs_type}/1"] = max(bench_single(impl, obs_type, n_steps) for _ in range(repeats))
        for n in vec_sizes:
            vec_steps = max(n_steps // n, 20)
            out[f"{obs_type}/{n}"] = max(
                bench_vector(impl, obs_type, n, vec_steps) for _ in range(repeats)
            )
    return out


def ensure_theirs_venv(venv: Path) -> Path | None:
    """Create the gym-pusht venv if needed; return its python, or None (with a printed reason) on failure."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import gym_pusht"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(
        f"installing gym-pusht into {venv} (needs pymunk<7, so it gets its own venv) ...",
        flush=True,
    )
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "gym-pusht"],
            check=True,
            capture_output=True,
            text=True,
        )
        subprocess.run(check, check=True, capture_output=True)
    except (subprocess.CalledProcessError, OSError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        print(f"SKIP gym-pusht: could not install it into {venv}: {str(detail).strip()[-300:]}")
        return None
    return python


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--steps", type=int, default=3000, help="env steps per state/keypoints measurement"
    )
    p.add_argument("--pixel-steps", type=int, default=1000, help="env steps per pixel measurement")
    p.add_argument("--vec", type=int, nargs="*", default=[2, 8], help="AsyncVectorEnv sizes")
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs per number")
    p.add_argument("--theirs-venv", type=Path, default=REPO / ".bench/gym-pusht/.venv")
    p.add_argument("--no-theirs", action="store_true", help="skip gym-pusht")
    p.add_argument("--worker", choices=["ours", "gym_pusht"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:  # subprocess mode: print one JSON line
        print(
            json.dumps(
                run_worker(args.worker, args.steps, args.pixel_steps, args.vec, args.repeats)
            )
        )
        return 0

    ours = run_worker("ours", args.steps, args.pixel_steps, args.vec, args.repeats)
    theirs: dict[str, float] = {}
    if not args.no_theirs:
        python = ensure_theirs_venv(args.theirs_venv)
        if python is not None:
            cmd = [str(python), __file__, "--worker", "gym_pusht", "--steps", str(args.steps)]
            cmd += ["--pixel-steps", str(args.pixel_steps), "--repeats", str(args.repeats)]
            cmd += ["--vec", *map(str, args.vec)]
            res = subprocess.run(
                cmd, capture_output=True, text=True, env={**os.environ, "SDL_VIDEODRIVER": "dummy"}
            )
            if res.returncode == 0:
                theirs = json.loads(res.stdout.strip().splitlines()[-1])
            else:
                print(f"SKIP gym-pusht: its benchmark failed: {res.stderr.strip()[-500:]}")

    print(f"\nPush-T env steps/s ({os.cpu_count()} CPUs; single env and AsyncVectorEnv totals)\n")
    print("| obs_type | envs | ours steps/s | gym-pusht steps/s | ours / theirs |")
    print("|---|---:|---:|---:|---:|")
    for key, rate in ours.items():
        obs_type, n = key.split("/")
        their = theirs.get(key)
        their_s = f"{their:,.0f}" if their else "skipped"
        ratio = f"{rate / their:.2f}x" if their else "-"
        print(f"| {obs_type} | {n} | {rate:,.0f} | {their_s} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
