"""Simulation environments. Importing `envs` registers the gymnasium ids (and does nothing else)."""

from gymnasium.envs.registration import register, registry

MAX_EPISODE_STEPS = (
    300  # Push-T's episode cap: the time limit of PushT-v0 and of the scripted expert
)

if "PushT-v0" not in registry:
    register(id="PushT-v0", entry_point="envs.pusht:PushTEnv", max_episode_steps=MAX_EPISODE_STEPS)
