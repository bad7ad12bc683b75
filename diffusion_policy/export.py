"""`dp export`: a diffusion policy's whole sampling loop as one ONNX or TorchScript file.

The file is a pure function from raw observations and the initial noise to actions, so a robot
computer needs only onnxruntime (or libtorch) and numpy to run it:

    inputs:  one per obs key in shape-meta order, (B, To, ...) as `predict_action_chunk` takes them
             (float32 low-dim, uint8 HWC images), then `noise` (B, T, Da) float32 ~ N(0, I)
    outputs: `action` (B, Ta, Da), the executed slice [To-1, To-1+Ta), and `action_pred` (B, T, Da)

Inside: normalisation, the observation encoder, K deterministic DDIM steps (eta = 0) unrolled with
fixed coefficients (`sampling.DDIMSampler`) and unnormalisation. The noise is an input, so the caller
owns the randomness. FILE.json (the sidecar) names the inputs with their shapes and dtypes, the
timing constants and how to call the file.

ONNX exporters (torch 2.13; DDIM-10 of runs/pusht_state_cpu_60min on 2 shared CPU cores):

* `legacy` (torch.onnx.export(dynamo=False), TorchScript-based, opset 17) exports a low-dim policy
  in the reference layout in about 7 s, with a dynamic batch axis that works. It cannot export
  image policies (no antialiased resize; the encoder's reshapes keep the traced batch size) nor the
  packed layout (`unfold` of a padded tensor). Deprecated by PyTorch since 2.9, still shipped.
* `dynamo` (torch.export + onnxscript, opset 18) exports everything, with a symbolic batch axis that
  torch.export proves valid for every B, but takes 1.5 minutes for the same file (mostly in
  torch.export's decompositions), 3 to 6 for the packed layout.
* `auto` (the default): legacy where it works (low-dim policies, reference layout), else dynamo.

Layouts: `reference` runs the policy's denoiser as it is (the UNet's Conv1d on (B, C, T), or the
transformer); `packed` runs `sampling.PackedUnet` (time-major GEMMs), for the UNet only: a
transformer (DP-T) exports in the reference layout, `auto` picks it and `packed` is refused.
For the UNet at batch 1 on one core packed is 6-10 % faster in both runtimes (onnxruntime 19.2 vs
20.6 ms, libtorch 20.5 vs 21.8 ms; the eager policy takes 39 ms), so TorchScript defaults to it.
ONNX defaults to reference: for packed only the dynamo exporter works, minutes of export for ~1.5 ms.
A packed TorchScript file also carries the unused reference weights.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import statistics
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffusion_policy.errors import ConfigError, UserError
from diffusion_policy.policies.diffusion_sampling import DDIMSampler, packed_denoiser

FORMATS = ("onnx", "torchscript")
LAYOUTS = ("auto", "reference", "packed")
ONNX_EXPORTERS = ("auto", "dynamo", "legacy")
# opset 18 for dynamo: Resize with antialias (image encoders) and GroupNormalization
OPSET = {"legacy": 17, "dynamo": 18}
OUTPUTS = ("action", "action_pred")
SIDECAR_VERSION = 1
# --check's gate, as a fraction of the action range: 2e-5 is 0.01 px on Push-T's 512 px. Float32
# rounding, amplified by DDIM's 1/sqrt(abar_t), already moves actions by ~1e-3 px between torch's own
# equivalent paths for the paper's 66 M UNet; its ONNX file is off by 1.4e-3 px, the CPU image
# preset's by 1.6e-3 px (both untrained). A wrong export is off by pixels.
DEFAULT_TOLERANCE = 2e-5
CHECK_BATCHES = (1, 3)  # a dynamic batch axis is checked at sizes other than the traced one (2)
INSTALL_HINT = "pip install -e '.[export]'"


class ExportError(UserError):
    """The export cannot be made as asked, or the exported file does not match the policy."""


class ExportedPolicy(nn.Module):
    """obs tensors (shape-meta order) + noise (B, T, Da) -> (action (B, Ta, Da), action_pred (B, T, Da))."""

    def __init__(self, policy, num_steps: int, layout: str):
        super().__init__()
        packed = packed_denoiser(policy) if layout == "packed" else None
        self.sampler = DDIMSampler(policy, num_steps, packed)
        executed = policy.executed_slice()
        self.start, self.stop = executed.start, executed.stop

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        action_pred = self.sampler(*inputs)
        return action_pred[:, self.start : self.stop], action_pred


# --- export ----------------------------------------------------------------------------------------


def has_images(policy) -> bool:
    return any(s.kind == "rgb" for s in policy.shape_meta.obs.values())


def resolve_layout(fmt: str, layout: str, policy=None) -> str:
    """`auto` -> packed for TorchScript where the denoiser has a packed layout (the UNet's), else reference."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout {layout!r}: expected one of {LAYOUTS}")
    packable = policy is None or packed_denoiser(policy) is not None
    if layout == "packed" and not packable:
        raise ExportError(
            f"the packed layout is the UNet's; a {type(policy.model).__name__} denoiser exports in "
            "the reference layout (--layout reference or auto)"
        )
    if layout != "auto":
        return layout
    return "reference" if fmt == "onnx" or not packable else "packed"


def resolve_onnx_exporter(policy, layout: str, exporter: str) -> str:
    """`auto` -> legacy for low-dim policies in the reference layout, else dynamo (see the module doc)."""
    if exporter not in ONNX_EXPORTERS:
        raise ConfigError(f"ONNX exporter {exporter!r}: expected one of {ONNX_EXPORTERS}")
    legacy_ok = layout == "reference" and not has_images(policy)
    if exporter == "auto":
        return "legacy" if legacy_ok else "dynamo"
    if exporter == "legacy" and not legacy_ok:
        what = "the packed layout" if layout == "packed" else "image policies"
        raise ExportError(
            f"the legacy ONNX exporter cannot export {what} correctly; use --onnx-exporter dynamo"
        )
    return exporter


def require_onnx_exporter(exporter: str) -> None:
    """One-line errors for missing packages, before any slow work."""
    try:
        import onnx  # noqa: F401  (both exporters serialise through it)

        if exporter == "dynamo":
            import onnxscript  # noqa: F401
    except ImportError as e:
        raise ExportError(
            f"the {exporter} ONNX exporter needs the package {e.name!r}: {INSTALL_HINT}"
        ) from None


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ExportError(
            f"checking an ONNX export needs onnxruntime, which is not installed: {INSTALL_HINT}"
        ) from None
    return onnxruntime


def input_names(policy) -> list[str]:
    names = [*policy.shape_meta.obs, "noise"]
    clash = sorted(set(policy.shape_meta.obs) & {"noise", *OUTPUTS})
    if clash:
        raise ExportError(f"observation key(s) {clash} clash with the exported file's own names")
    return names


def random_inputs(policy, batch: int, seed: int = 0) -> list[torch.Tensor]:
    """Plausible raw inputs in input_names() order: low-dim obs uniform in the fitted [min, max],
    random uint8 frames, and standard normal noise (B, T, Da)."""
    g = torch.Generator().manual_seed(seed)
    to, out = policy.config.n_obs_steps, []
    for key, spec in policy.shape_meta.obs.items():
        shape = (batch, to, *spec.shape)
        if spec.kind == "rgb":
            out.append(torch.randint(0, 256, shape, dtype=torch.uint8, generator=g))
            continue
        u = torch.rand(shape, generator=g)
        if policy.normalizer.is_fitted(key):
            stats = policy.normalizer.stats(key)
            lo, hi = stats["min"].reshape(spec.shape), stats["max"].reshape(spec.shape)
            u = lo + u * (hi - lo)
        out.append(u)
    horizon, da = policy.config.horizon, policy.shape_meta.action_dim
    out.append(torch.randn(batch, horizon, da, generator=g))
    return out


@contextmanager
def quiet_exporters() -> Iterator[None]:
    """Silence the exporters' warnings (tracer notes on constant Python floats, deprecations) and
    the dynamo exporter's log notes about optional torchvision ops."""
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        onnx_log.setLevel(level)


def export_policy(
    policy,
    out: str | Path,
    fmt: str = "onnx",
    num_steps: int = 10,
    timestep_spacing: str | None = None,
    layout: str = "auto",
    batch_size: int | None = None,
    onnx_exporter: str = "auto",
    checkpoint: str | None = None,
) -> dict[str, Any]:
    """Export `policy`'s DDIM-`num_steps` sampling to `out`, write `out`.json, return the sidecar.

    Switches the policy to DDIM-`num_steps` (with `timestep_spacing`) and to eval mode, so that its
    own `predict_action_chunk` is the reference the file matches. `batch_size` None exports a
    dynamic batch axis; an int fixes it.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"format {fmt!r}: expected one of {FORMATS}")
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"batch size {batch_size}: must be >= 1")
    if not hasattr(policy, "set_sampler"):
        raise ExportError(f"export supports diffusion policies only, not {type(policy).__name__}")
    if policy.device.type != "cpu":
        raise ExportError(f"export a policy on the CPU, not on {policy.device}")
    names = input_names(policy)
    layout = resolve_layout(fmt, layout, policy)
    exporter = "jit.trace"
    if fmt == "onnx":
        exporter = resolve_onnx_exporter(policy, layout, onnx_exporter)
        require_onnx_exporter(exporter)
    policy.set_sampler("ddim", num_steps, timestep_spacing)
    policy.eval()
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"--out {out} is a directory; give a file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    module = ExportedPolicy(policy, num_steps, layout).eval()
    example = tuple(random_inputs(policy, batch_size or 2))  # 2: not a size a tracer specialises
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        # is_fitted reads each key's flag once and remembers it: afterwards normalize() has no
        # branch on tensor data for torch.export to trip over (an unfitted key still raises)
        for key in policy.normalizer.dims:
            policy.normalizer.is_fitted(key)
        with torch.no_grad(), quiet_exporters():
            if fmt == "torchscript":
                traced = torch.jit.trace(module, example, check_trace=False)
                torch.jit.save(traced, str(tmp))
            else:
                if exporter == "legacy":
                    axes = None if batch_size else {n: {0: "B"} for n in [*names, *OUTPUTS]}
                    how: dict[str, Any] = {"dynamic_axes": axes}
                else:
                    batch = torch.export.Dim("B", min=1, max=65536)
                    shapes = None if batch_size else (tuple({0: batch} for _ in names),)
                    how = {"dynamic_shapes": shapes, "external_data": False, "verbose": False}
                torch.onnx.export(
                    module,
                    example,
                    str(tmp),
                    dynamo=exporter == "dynamo",
                    opset_version=OPSET[exporter],
                    input_names=names,
                    output_names=list(OUTPUTS),
                    **how,
                )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    sidecar = describe(policy, out, fmt, exporter, layout, num_steps, batch_size, checkpoint)
    write_sidecar(out, sidecar)
    return sidecar


def describe(
    policy,
    out: Path,
    fmt: str,
    exporter: str,
    layout: str,
    num_steps: int,
    batch_size: int | None,
    checkpoint: str | None,
) -> dict[str, Any]:
    """The sidecar: everything a caller without our code needs to feed the file and read it."""
    c, meta = policy.config, policy.shape_meta
    b: int | str = batch_size or "B"
    to, t, ta, da = c.n_obs_steps, c.horizon, c.n_action_steps, meta.action_dim
    inputs = [
        {
            "name": key,
            "shape": [b, to, *spec.shape],
            "dtype": "uint8" if spec.kind == "rgb" else "float32",
            "kind": spec.kind,
        }
        for key, spec in meta.obs.items()
    ]
    inputs.append({"name": "noise", "shape": [b, t, da], "dtype": "float32", "kind": "noise"})
    executed = policy.executed_slice()
    return {
        "format_version": SIDECAR_VERSION,
        "format": fmt,
        "file": out.name,
        "exporter": {
            "legacy": f"torch.onnx.export(dynamo=False), opset {OPSET['legacy']}",
            "dynamo": f"torch.onnx.export(dynamo=True), opset {OPSET['dynamo']}",
            "jit.trace": "torch.jit.trace",
        }[exporter],
        "torch_version": torch.__version__,
        "layout": layout,
        "checkpoint": checkpoint,
        "policy": policy.config.name,
        "sampler": "ddim",
        "eta": 0.0,
        "num_inference_steps": num_steps,
        "timestep_spacing": policy.config.noise.timestep_spacing,
        "n_obs_steps": to,
        "n_action_steps": ta,
        "horizon": t,
        "action_dim": da,
        "executed_slice": [executed.start, executed.stop],
        "batch_size": batch_size if batch_size else "dynamic",
        "inputs": inputs,
        "outputs": [
            {"name": "action", "shape": [b, ta, da], "dtype": "float32"},
            {"name": "action_pred", "shape": [b, t, da], "dtype": "float32"},
        ],
        "usage": (
            "Inputs in this order (TorchScript: module.forward(*inputs) returns the tuple "
            "(action, action_pred)) or by name (ONNX). Observations are the n_obs_steps newest "
            "frames per key, oldest first, in raw units as the env reports them (images uint8 HWC "
            "0..255 at exactly the listed size); noise is fresh standard normal float32 each call. "
            "Execute `action` (raw units): its first row answers the newest observation; query "
            "again after n_action_steps steps. `action_pred` is the whole predicted chunk. On a CPU "
            "at batch 1, one intra-op thread is fastest."
        ),
    }


def write_sidecar(out: Path, sidecar: dict[str, Any]) -> Path:
    path = Path(f"{out}.json")
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(sidecar, indent=2) + "\n")
    os.replace(tmp, path)
    return path


# --- parity and latency ----------------------------------------------------------------------------

Runner = Callable[[list[np.ndarray]], tuple[np.ndarray, np.ndarray]]


def load_runner(path: str | Path, sidecar: dict[str, Any]) -> Runner:
    """Run the exported file as a robot would: onnxruntime on one thread, or torch.jit.load."""
    names = [i["name"] for i in sidecar["inputs"]]
    if sidecar["format"] == "onnx":
        ort = import_onnxruntime()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3  # no notes about functions it cannot constant-fold (Mish)
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

        def run_onnx(xs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            action, action_pred = sess.run(list(OUTPUTS), dict(zip(names, xs, strict=True)))
            return action, action_pred

        return run_onnx
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", DeprecationWarning
        )  # TorchScript is deprecated in torch 2.13
        module = torch.jit.load(str(path), map_location="cpu")

    def run_torchscript(xs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            action, action_pred = module(*[torch.from_numpy(x) for x in xs])
        return action.numpy(), action_pred.numpy()

    return run_torchscript


def check_export(
    path: str | Path,
    sidecar: dict[str, Any],
    policy,
    tolerance: float = DEFAULT_TOLERANCE,
    runner: Runner | None = None,
) -> dict[str, Any]:
    """Max abs error of the file against the policy's eager reference loop, on random obs.

    The reference is `policy.predict_action_chunk(obs, noise=noise)` with the eager backend (the
    diffusers scheduler loop), at batch 1 and 3 for a dynamic batch axis (the trace used 2). Raises
    ExportError above `tolerance` times the action range (the largest max - min of the training
    actions over the action dims). `policy` must be the one that was exported.
    """
    run = runner or load_runner(path, sidecar)
    fixed = sidecar["batch_size"]
    batches = (fixed,) if isinstance(fixed, int) else CHECK_BATCHES
    keys = [i["name"] for i in sidecar["inputs"][:-1]]
    bound = tolerance * action_range(policy)
    backend = policy.inference_backend
    policy.set_inference_backend("eager")
    try:
        err = 0.0
        for i, b in enumerate(batches):
            xs = random_inputs(policy, b, seed=100 + i)
            ref = policy.predict_action_chunk(dict(zip(keys, xs[:-1])), noise=xs[-1])
            try:
                got = run([x.numpy() for x in xs])
            except Exception as e:  # e.g. a batch size baked into the graph
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ExportError(f"{path} fails at batch {b}: {first}") from None
            for name, value in zip(OUTPUTS, got, strict=True):
                want = ref[name].cpu().numpy()
                if value.shape != want.shape:
                    raise ExportError(
                        f"{path}: output {name} has shape {value.shape} at batch {b}, expected {want.shape}"
                    )
                err = max(err, float(np.abs(value - want).max()))
    finally:
        policy.set_inference_backend(backend)
    if not err <= bound:
        raise ExportError(
            f"{path} does not match the policy: max abs error {err:.3g} action units > {bound:.3g} "
            f"(tolerance {tolerance:g} of the action range)"
        )
    return {
        "max_abs_error": err,
        "tolerance": tolerance,
        "max_abs_error_allowed": bound,
        "batch_sizes": list(batches),
    }


def action_range(policy) -> float:
    """The largest max - min of the training actions over the action dims (1 if not fitted)."""
    if not policy.normalizer.is_fitted("action"):
        return 1.0
    stats = policy.normalizer.stats("action")
    return max(float((stats["max"] - stats["min"]).max()), 1e-12)


def measure_latency(
    run: Runner, inputs: list[np.ndarray], max_runs: int = 20, budget_s: float = 3.0
) -> dict[str, float]:
    """Median wall time of `run(inputs)` in ms, after 3 warm-up calls; at most `budget_s` seconds."""
    for _ in range(3):
        run(inputs)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (not times or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        run(inputs)
        times.append(time.perf_counter() - t)
    return {"median_ms": 1e3 * statistics.median(times), "runs": len(times)}


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- dp export: a checkpoint to a file, with its report ------------------------------------------


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    fmt: str = "onnx",
    *,
    steps: int | None = None,
    spacing: str | None = None,
    layout: str = "auto",
    batch_size: int | None = None,
    onnx_exporter: str = "auto",
    check: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Export a diffusion checkpoint's sampling loop (DDIM-`steps`, default: its own DDIM steps or
    10), say what was written, and with `check` compare the file with the eager policy."""
    from diffusion_policy.checkpoint import load_policy, read_checkpoint_meta

    say = say or functools.partial(print, flush=True)
    path, cfg, _ = read_checkpoint_meta(checkpoint)
    if cfg.policy.name != "diffusion":
        raise ExportError(
            f"dp export supports diffusion policies only; {path} holds a {cfg.policy.name!r} "
            "policy, whose sampler has no fixed-step graph to export"
        )
    if check and fmt == "onnx":
        import_onnxruntime()  # fail now, not after the export
    policy, cfg, _ = load_policy(path)
    noise = cfg.policy.noise
    if steps is None:
        steps = noise.num_inference_steps if noise.sampler == "ddim" else 10
    layout = resolve_layout(fmt, layout, policy)
    how = "torch.jit.trace"
    if fmt == "onnx":
        exporter = resolve_onnx_exporter(policy, layout, onnx_exporter)
        require_onnx_exporter(exporter)
        how = f"the {exporter} ONNX exporter" + (
            " (a minute or more)" if exporter == "dynamo" else ""
        )
    say(
        f"exporting {path}: DDIM-{steps} ({spacing or noise.timestep_spacing}), {layout} layout, "
        f"batch {batch_size or 'dynamic'}, with {how}"
    )
    start = time.perf_counter()
    sidecar = export_policy(
        policy, out, fmt, steps, spacing, layout, batch_size, onnx_exporter, checkpoint=str(path)
    )
    out = Path(out)
    size = out.stat().st_size / 2**20
    say(f"wrote {out} ({size:.1f} MiB) and {out}.json in {time.perf_counter() - start:.1f} s")
    for kind, items in (("input ", sidecar["inputs"]), ("output", sidecar["outputs"])):
        for i in items:
            say(f"  {kind} {i['name']}: {tuple(i['shape'])} {i['dtype']}")
    if check:
        sidecar["check"] = _check_and_time(out, sidecar, policy, tolerance, say)
        write_sidecar(out, sidecar)
    return sidecar


def _check_and_time(
    out: Path, sidecar: dict[str, Any], policy, tolerance: float, say: Callable[[str], None]
) -> dict[str, Any]:
    runner = load_runner(out, sidecar)
    result = check_export(out, sidecar, policy, tolerance, runner)
    b1 = sidecar["batch_size"] if isinstance(sidecar["batch_size"], int) else 1
    with torch_threads(1):
        result["latency"] = measure_latency(runner, [x.numpy() for x in random_inputs(policy, b1)])
    say(
        f"check: max abs error {result['max_abs_error']:.2e} action units against the eager "
        f"policy at batch {', '.join(map(str, result['batch_sizes']))} (allowed "
        f"{result['max_abs_error_allowed']:.2g}); batch {b1} takes "
        f"{result['latency']['median_ms']:.1f} ms (median of {result['latency']['runs']}, 1 thread)"
    )
    return result
