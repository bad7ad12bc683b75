"""Simulation environments. Importing `envs` registers the gymnasium ids (and does nothing else)."""

from gymnasium.envs.registration import register, registry

if "PushT-v0" not in registry:
    register(id="PushT-v0", entry_point="envs.pusht:PushTEnv", max_episode_steps=300)
