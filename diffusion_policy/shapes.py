"""The contract between data, models and policies: what a policy observes and what it outputs.

It sits on the ground floor so that policies and models never import the data layer: a dataset
produces a `ShapeMeta`, a checkpoint stores it, and a policy is built from it. Besides shapes it
carries what the policy must know per key and cannot learn from the weights: the normalisation mode
of low-dim keys and of the action, and each camera's resize and crop. `to_dict` writes these only
where they differ from the defaults, so the meta.json of a Push-T preset is the same as before, and
a meta.json written before they existed loads with the defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

OBS_KINDS = ("low_dim", "rgb")
NORMALIZE = ("minmax", "identity")  # minmax: min/max to [-1, 1]; identity: raw values


@dataclass
class ObsSpec:
    shape: tuple[int, ...]  # per-frame shape, e.g. (20,) or (96, 96, 3)
    dtype: str  # "float32" for low_dim, "uint8" for rgb
    kind: str  # "low_dim" | "rgb"
    normalize: str = "minmax"  # low_dim only (rgb is always [0, 255] -> [-1, 1])
    resize: tuple[int, int] | None = (
        None  # rgb: resize to (H, W) first; None: the encoder's setting
    )
    crop: tuple[int, int] | None = None  # rgb: crop (h, w); None: the encoder's setting

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        if self.kind not in OBS_KINDS:
            raise ValueError(f"ObsSpec.kind must be one of {OBS_KINDS}, got {self.kind!r}")
        if self.normalize not in NORMALIZE:
            raise ValueError(
                f"ObsSpec.normalize must be one of {NORMALIZE}, got {self.normalize!r}"
            )
        for name in ("resize", "crop"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, (int(v[0]), int(v[1])))

    def to_dict(self) -> dict:
        d = {"shape": list(self.shape), "dtype": self.dtype, "kind": self.kind}
        if self.normalize != "minmax":
            d["normalize"] = self.normalize
        d.update({k: list(v) for k in ("resize", "crop") if (v := getattr(self, k)) is not None})
        return d

    @classmethod
    def from_dict(cls, v: dict) -> ObsSpec:
        return cls(
            tuple(v["shape"]),
            str(v["dtype"]),
            str(v["kind"]),
            str(v.get("normalize", "minmax")),
            v.get("resize"),
            v.get("crop"),
        )


@dataclass
class ShapeMeta:
    obs: dict[str, ObsSpec]  # ordered: rgb keys first, then low_dim keys, in a fixed order
    action_dim: int
    action_normalize: str = "minmax"

    def __post_init__(self) -> None:
        if self.action_normalize not in NORMALIZE:
            raise ValueError(
                f"ShapeMeta.action_normalize must be one of {NORMALIZE}, got {self.action_normalize!r}"
            )

    def normalize_modes(self) -> dict[str, str]:
        """Normaliser key -> mode: "action" and every low-dim key."""
        modes = {"action": self.action_normalize}
        modes.update({k: s.normalize for k, s in self.obs.items() if s.kind == "low_dim"})
        return modes

    def to_dict(self) -> dict:
        """Plain lists/str/int, so it can go into a checkpoint's config.yaml."""
        d = {
            "obs": {k: s.to_dict() for k, s in self.obs.items()},
            "action_dim": int(self.action_dim),
        }
        if self.action_normalize != "minmax":
            d["action_normalize"] = self.action_normalize
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ShapeMeta:
        return cls(
            obs={k: ObsSpec.from_dict(v) for k, v in d["obs"].items()},
            action_dim=int(d["action_dim"]),
            action_normalize=str(d.get("action_normalize", "minmax")),
        )
