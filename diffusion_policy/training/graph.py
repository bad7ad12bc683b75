"""A whole training step captured in one CUDA graph and replayed every step.

One step of the paper's UNet makes about 4,400 operator calls (convs, GroupNorm, Mish, FiLM, the
backward of each, AdamW and the EMA; counted with torch's profiler). On an H100 most of them finish
faster than Python and the CUDA driver can issue the next, so an eager step is bound by launches,
not arithmetic. Capturing forward + backward + grad clipping + AdamW + EMA once and replaying the
graph issues them all with a single call (1.66x on an H100, docs/BENCHMARKS.md).

What stays outside the graph, so that a graphed run draws exactly the randomness of an eager run:
the batch gather, the loss noise and timesteps (a function of (seed, step)), the image crop offsets
(drawn on the CPU as the eager encoder draws them), the EMA decay and the learning rate (both are
device tensors the graph reads; the scheduler writes the lr tensor in place). They are copied into
the graph's static input buffers before each replay.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from diffusion_policy.models.vision import CropRandomizer, crop_offsets


def _clone(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    return tree.detach().clone() if isinstance(tree, torch.Tensor) else tree


def _copy_into(dst: Any, src: Any) -> None:
    if isinstance(dst, dict):
        for k in dst:
            _copy_into(dst[k], src[k])
    elif isinstance(dst, torch.Tensor):
        dst.copy_(src, non_blocking=True)


class GraphedTrainStep:
    """`step(batch) -> loss`: `step_fn` (step.py's train_step, the eager step) captured once.

    The learner's optimizer must be built with capturable=True and a tensor lr. Warm-up
    iterations (needed before capture, for cuDNN and the allocator) change weights, optimizer
    state and RNG state, so all are snapshotted first and restored after capture: the run
    continues from exactly where it was, and draws what an eager run draws.
    """

    def __init__(
        self,
        learner: Any,
        example_batch: dict[str, Any],
        step_fn: Callable[[Any, dict[str, Any], torch.Tensor], torch.Tensor],
        warmup: int = 3,
    ):
        self.learner, self.step_fn = learner, step_fn
        self.policy, self.optimizer, self.ema = learner.policy, learner.optimizer, learner.ema
        self.batch = _clone(example_batch)
        device = next(self.policy.parameters()).device
        self.ema_weight = torch.zeros((), device=device)
        # the image encoders' random crops read their offsets from these buffers while graphed
        self.crops: list[tuple[CropRandomizer, torch.Tensor]] = []
        for m in self.policy.modules():
            if isinstance(m, CropRandomizer):
                buf = torch.zeros(0, 2, dtype=torch.long, device=device)
                self.crops.append((m, buf))

        saved = self._snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._fill_crops()
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        self._fill_crops()
        with torch.cuda.graph(self.graph):  # records kernels; runs none of them
            self.loss = self._step()
        # after the capture, whose crop draw also counts: back to the state before warm-up
        self._restore(saved)
        del saved

    def _step(self) -> torch.Tensor:
        return self.step_fn(self.learner, self.batch, self.ema_weight)

    def _fill_crops(self) -> None:
        """Draw this step's crop offsets on the CPU, exactly as the eager encoder would."""
        for i, (m, buf) in enumerate(self.crops):
            x = _find_images(self.batch)
            if x is None:
                continue
            n, hh, ww = x
            offsets = crop_offsets(n, (hh, ww), m.crop_shape, True, buf.device, m.generator)
            if buf.shape[0] != n:
                buf = torch.empty(n, 2, dtype=torch.long, device=buf.device)
                self.crops[i] = (m, buf)
                m.graph_offsets = buf
            buf.copy_(offsets, non_blocking=True)

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        _copy_into(self.batch, batch)
        self._fill_crops()
        self.ema_weight.fill_(1.0 - (self.ema.next_decay() if self.ema is not None else 0.0))
        self.graph.replay()
        return self.loss

    # --- exact snapshot of everything a warm-up step changes --------------------------------------

    def _snapshot(self) -> dict[str, Any]:
        return {
            "params": [p.detach().clone() for p in self.policy.parameters()],
            "buffers": [b.detach().clone() for b in self.policy.buffers()],
            "opt": {
                id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                for p, s in self.optimizer.state.items()
            },
            "ema": [t.detach().clone() for t in self.ema.model.state_dict().values()]
            if self.ema is not None
            else [],
            "cpu_rng": torch.get_rng_state(),
            "gens": [m.generator.get_state() for m, _ in self.crops if m.generator is not None],
        }

    @torch.no_grad()
    def _restore(self, s: dict[str, Any]) -> None:
        for p, v in zip(self.policy.parameters(), s["params"], strict=True):
            p.copy_(v)
        for b, v in zip(self.policy.buffers(), s["buffers"], strict=True):
            b.copy_(v)
        for p in list(self.optimizer.state):
            if id(p) in s["opt"]:
                for k, v in s["opt"][id(p)].items():
                    cur = self.optimizer.state[p].get(k)
                    if isinstance(cur, torch.Tensor):
                        cur.copy_(v)
                    else:
                        self.optimizer.state[p][k] = v
            else:  # state the warm-up created: zero it in place (a fresh AdamW state is all
                # zeros) and keep the tensors, so the captured step does not allocate them again
                for v in self.optimizer.state[p].values():
                    if isinstance(v, torch.Tensor):
                        v.zero_()
        if self.ema is not None:
            for t, v in zip(self.ema.model.state_dict().values(), s["ema"], strict=True):
                t.copy_(v)
        torch.set_rng_state(s["cpu_rng"])
        gens = iter(s["gens"])
        for m, _ in self.crops:
            if m.generator is not None:
                m.generator.set_state(next(gens))


def graph_unsupported_reason(policy: nn.Module) -> str | None:
    """Why a policy's step cannot be captured, or None. The crop buffers assume one camera."""
    if not getattr(policy, "graph_safe", False):
        return f"{type(policy).__name__} is not marked graph_safe"
    rgb = [k for k, s in policy.shape_meta.obs.items() if s.kind == "rgb"]
    if len(rgb) > 1:
        return f"{len(rgb)} cameras (graphed crops support one)"
    return None


def _find_images(batch: dict[str, Any]) -> tuple[int, int, int] | None:
    """(N, H, W) of the frames `crop` sees: the (B, To, H, W, C) camera in the batch, flattened."""
    for v in batch.get("obs", {}).values():
        if isinstance(v, torch.Tensor) and v.ndim == 5:
            b, to, hh, ww, _ = v.shape
            return b * to, hh, ww
    return None
