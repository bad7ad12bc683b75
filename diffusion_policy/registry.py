"""The only name -> builder tables. Unknown names list the known ones."""

from __future__ import annotations

from typing import Any

from diffusion_policy.errors import ConfigError
from diffusion_policy.policies.diffusion import DiffusionConfig, DiffusionPolicy
from diffusion_policy.policies.ibc import IBCConfig, IBCPolicy

# policy name -> (config dataclass, policy class)
POLICIES: dict[str, tuple[type, type]] = {
    "diffusion": (DiffusionConfig, DiffusionPolicy),
    "ibc": (IBCConfig, IBCPolicy),
}


def _lookup(table: dict[str, Any], name: str, what: str) -> Any:
    if name not in table:
        raise ConfigError(f"unknown {what} {name!r} (known: {', '.join(sorted(table))})")
    return table[name]


def policy_config_class(name: str) -> type:
    return _lookup(POLICIES, name, "policy")[0]


def policy_class(name: str) -> type:
    return _lookup(POLICIES, name, "policy")[1]
