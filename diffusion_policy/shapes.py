"""The contract between data, models and policies: what a policy observes and what it outputs.

It sits on the ground floor so that policies and models never import the data layer: a dataset
produces a `ShapeMeta`, a checkpoint stores it, and a policy is built from it.
"""

from __future__ import annotations

from dataclasses import dataclass

OBS_KINDS = ("low_dim", "rgb")


@dataclass
class ObsSpec:
    shape: tuple[int, ...]  # per-frame shape, e.g. (20,) or (96, 96, 3)
    dtype: str  # "float32" for low_dim, "uint8" for rgb
    kind: str  # "low_dim" | "rgb"

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        if self.kind not in OBS_KINDS:
            raise ValueError(f"ObsSpec.kind must be one of {OBS_KINDS}, got {self.kind!r}")


@dataclass
class ShapeMeta:
    obs: dict[str, ObsSpec]  # ordered: rgb keys first, then low_dim keys, in a fixed order
    action_dim: int

    def to_dict(self) -> dict:
        """Plain lists/str/int, so it can go into a checkpoint's config.yaml."""
        return {
            "obs": {
                k: {"shape": list(s.shape), "dtype": s.dtype, "kind": s.kind}
                for k, s in self.obs.items()
            },
            "action_dim": int(self.action_dim),
        }

    @classmethod
    def from_dict(cls, d: dict) -> ShapeMeta:
        return cls(
            obs={
                k: ObsSpec(tuple(v["shape"]), str(v["dtype"]), str(v["kind"]))
                for k, v in d["obs"].items()
            },
            action_dim=int(d["action_dim"]),
        )
