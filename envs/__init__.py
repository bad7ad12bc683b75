"""Simulation environments. Importing `envs` registers the gymnasium ids (and does nothing else)."""

from gymnasium.envs.registration import register, registry

MAX_EPISODE_STEPS = (
    300  # Push-T's episode cap: the time limit of PushT-v0 and of the scripted expert
)
BLOCKPUSH_MAX_EPISODE_STEPS = 350  # Block Pushing's (the original's BlockPushMultimodal-v0)

if "PushT-v0" not in registry:
    register(id="PushT-v0", entry_point="envs.pusht:PushTEnv", max_episode_steps=MAX_EPISODE_STEPS)
if "BlockPushMultimodal-v0" not in registry:
    register(
        id="BlockPushMultimodal-v0",
        entry_point="envs.block_pushing:BlockPushMultimodalEnv",
        max_episode_steps=BLOCKPUSH_MAX_EPISODE_STEPS,
    )
