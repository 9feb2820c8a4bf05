"""Run steps [a, b) of a request's denoising loop, and hand step b what it needs as numpy.

A diffuse call may run a chunk of the loop (`step_range=(a, b)`) instead of all `steps`. The
pipeline's own loop runs the chunk: while it runs, the pipeline holds a stand-in for its scheduler
(`_WindowedScheduler`) whose `set_timesteps` sets the whole schedule of `steps`, moves the step
index to `a` and restores the saved scheduler state, and whose `timesteps` are only `[a, b)`. The
saved latents go in as the pipeline's `latents=`, each request's generator resumes from its saved
state. So a request run in chunks takes the same arithmetic path as one call.

A chunk that ends before the last step returns, per request, the input embeddings and its chunk
state, all numpy (keys below); one that ends at the last step returns `{"latents": ...}`, exactly
as a one-call diffuse does, so decode is unchanged.

    chunk/step                         int64 ()   the next step to run (b)
    chunk/latents                      the latents at step b, in the pipeline's layout
    chunk/rng_state                    uint8 (n,) the request's torch.Generator state
    chunk/scheduler_class              str ()     the scheduler that made the state
    chunk/scheduler/<field>[/<i>]      what the scheduler's step() carries to the next step
    <key>.dtype                        str ()     only for bfloat16 tensors (kept as float32: lossless)

Only schedulers whose carried state is listed in `CARRIED_STATE` can be chunked; any other, or
one that draws noise from torch's global RNG in `step`, raises `ConfigError` (a chunked run could
not be exact). numpy at import; torch only when called.
"""
from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Any

import numpy as np

from trident_rs.errors import ConfigError, InvalidRequestError
from trident_rs.models.tensors import StepCallback, generators, split, step_callback

if TYPE_CHECKING:
    import torch

    from trident_rs.request import GenerationParams

CHUNK = "chunk/"
STEP, LATENTS, RNG = CHUNK + "step", CHUNK + "latents", CHUNK + "rng_state"
RNG_IN = "rng_state"  # the generator state an earlier stage left (an edit's encode: `models.image_edit`)
SCHEDULER_CLASS, SCHEDULER = CHUNK + "scheduler_class", CHUNK + "scheduler/"
_DTYPE = ".dtype"

# What each scheduler's step() carries from one step to the next besides its step index (checked
# against diffusers 0.42), by kind: "int" (a counter, shared by a batch), "sample" (a tensor shaped
# like the latents: one per request), "samples" (a list of those, None where empty), "timesteps"
# (a list of 0-d timestep tensors, shared).
CARRIED_STATE: dict[str, dict[str, str]] = {
    "FlowMatchEulerDiscreteScheduler": {},
    "UniPCMultistepScheduler": {"model_outputs": "samples", "timestep_list": "timesteps", "last_sample": "sample",
                                "lower_order_nums": "int", "this_order": "int"},
    "DPMSolverMultistepScheduler": {"model_outputs": "samples", "lower_order_nums": "int"},
    "CogVideoXDDIMScheduler": {},
    # CogVideoX's pipeline keeps the previous x0 prediction in a loop local: the window holds it.
    "CogVideoXDPMScheduler": {"old_pred_original_sample": "sample"},
}
_PREV_X0 = "old_pred_original_sample"


def check_step_range(tensors: dict[str, np.ndarray], step_range: tuple[int, int] | None,
                     steps: int) -> tuple[int, int]:
    """The range [a, b) to run for one request (None: all `steps`), checked against the step its
    payload's chunk state is at (no state: step 0). Raises `InvalidRequestError`."""
    a, b = (0, steps) if step_range is None else _pair(step_range)
    if not 0 <= a < b <= steps:
        raise InvalidRequestError("step_range", f"({a}, {b}) is not within 0 <= a < b <= steps = {steps}")
    at = 0
    if STEP in tensors:
        step = tensors[STEP]
        if not isinstance(step, np.ndarray) or step.shape != () or step.dtype.kind not in "iu":
            raise InvalidRequestError("tensors", f"{STEP!r} must be a 0-d integer numpy array, got {step!r}")
        at = int(step)
    if at != a:
        have = f"a chunk state at step {at}" if STEP in tensors else "no chunk state (it starts at step 0)"
        raise InvalidRequestError("step_range", f"starts at step {a} but the payload carries {have}")
    return a, b


def check_chunk_state(tensors: dict[str, np.ndarray], latents_shape: tuple[int, ...], scheduler: str) -> None:
    """A payload resuming at a step > 0 carries a chunk state that fits: `latents_shape` is the
    request's latents shape (batch dim 1), `scheduler` the class name of the scheduler that will
    run it (`scheduler_name`). Raises `InvalidRequestError` naming what is wrong."""
    for key in (LATENTS, RNG, SCHEDULER_CLASS):
        if key not in tensors:
            raise InvalidRequestError("tensors", f"a chunk starting at step {int(tensors[STEP])} needs {key!r}")
    if str(tensors[SCHEDULER_CLASS]) != scheduler:
        raise InvalidRequestError("tensors", f"the chunk state is {tensors[SCHEDULER_CLASS]}'s; this executor "
                                             f"runs {scheduler}")
    for key, value in tensors.items():
        if not key.startswith(CHUNK) or key.endswith(_DTYPE):
            continue
        if not isinstance(value, np.ndarray):
            raise InvalidRequestError("tensors", f"{key!r} must be a numpy array, got {type(value).__name__}")
        is_sample = key == LATENTS or (key.startswith(SCHEDULER) and value.ndim > 1)
        if is_sample and value.shape != tuple(latents_shape):
            raise InvalidRequestError("tensors", f"{key!r} has shape {value.shape}; this request's latents "
                                                 f"are {tuple(latents_shape)}")
    rng = tensors[RNG]
    if rng.dtype != np.uint8 or rng.shape != _rng_shape():
        raise InvalidRequestError("tensors", f"{RNG!r} must be uint8 {_rng_shape()}, got {rng.dtype} {rng.shape}")


def _pair(step_range: Any) -> tuple[int, int]:
    try:
        a, b = step_range
    except (TypeError, ValueError):
        raise InvalidRequestError("step_range", f"must be a pair (a, b), got {step_range!r}") from None
    if not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in (a, b)):
        raise InvalidRequestError("step_range", f"must be two integers, got {step_range!r}")
    return int(a), int(b)


def scheduler_name(pipe) -> str:
    """The class name of the pipeline's (diffusers) scheduler."""
    return type(_diffusers_scheduler(pipe.scheduler)).__name__


@functools.cache
def _rng_shape() -> tuple[int, ...]:
    import torch

    return tuple(torch.Generator("cpu").get_state().shape)


class DenoiseChunk:
    """One pipeline call running steps [start, stop) for a group of same-shape requests.

        chunk = DenoiseChunk(pipe, params, embeddings, step_range)
        with chunk:
            latents = pipe(**inputs, height=..., **chunk.pipeline_kwargs(on_step))[0]
        return chunk.outputs(latents)

    The requests of one group share the range (and so the scheduler's shared counters); each keeps
    its own latents, per-request scheduler tensors and generator.
    """

    def __init__(self, pipe, params: list["GenerationParams"], embeddings: list[dict[str, np.ndarray]],
                 step_range: tuple[int, int] | None = None):
        self.pipe, self.embeddings = pipe, embeddings
        self.total = params[0].steps
        self.start, self.stop = (0, self.total) if step_range is None else _pair(step_range)
        if not 0 <= self.start < self.stop <= self.total:  # the executor checks each payload first
            raise InvalidRequestError("step_range", f"({self.start}, {self.stop}) is not within 0 <= a < b <= "
                                                    f"steps = {self.total}")
        self.generators = generators(params)
        self.loop_steps = params[0].denoise_steps  # an edit's loop skips the schedule's first steps
        if params[0].edit is not None and self.partial:
            raise InvalidRequestError("step_range", "an image edit runs all its steps in one diffuse call")
        self.latents = None
        if self.start == 0 and RNG_IN in embeddings[0]:  # an earlier stage drew from the generators
            import torch

            for g, t in zip(self.generators, embeddings):
                g.set_state(torch.from_numpy(t[RNG_IN].copy()))
        if self.start > 0:
            import torch

            for g, t in zip(self.generators, embeddings):
                g.set_state(torch.from_numpy(t[RNG].copy()))  # a copy: arrays from Ray are read-only
            self.device = pipe._execution_device  # (not free: diffusers looks through every module)
            self.latents = _stack(embeddings, LATENTS, self.device)
        self._window: _WindowedScheduler | None = None

    @property
    def partial(self) -> bool:
        """Whether the loop goes on after this chunk (state must travel)."""
        return self.start > 0 or self.stop < self.total

    def pipeline_kwargs(self, on_step: StepCallback | None = None) -> dict[str, Any]:
        """The pipeline call's arguments that run this chunk: all steps' schedule, the requests'
        generators, the saved latents (None at step 0), latent output, progress hook."""
        return dict(num_inference_steps=self.total, generator=self.generators, latents=self.latents,
                    output_type="latent", return_dict=False,
                    callback_on_step_end=step_callback(on_step, self.loop_steps, offset=self.start))

    def __enter__(self) -> "DenoiseChunk":
        if self.partial:
            owner = _pipeline_holding_scheduler(self.pipe)
            self._window = _WindowedScheduler(owner.scheduler, self, shards=_shards_latents(self.pipe))
            self._owner, self._original = owner, owner.scheduler
            vars(owner)["scheduler"] = self._window  # not setattr: diffusers would record it in the config
        return self

    def __exit__(self, *exc) -> None:
        if self._window is not None:
            vars(self._owner)["scheduler"] = self._original

    def outputs(self, latents: "torch.Tensor") -> list[dict[str, np.ndarray]]:
        """Per request: `{"latents"}` after the last step, else its embeddings and chunk state."""
        n = len(self.embeddings)
        if len(latents) == 0:  # a sequence-parallel rank that holds no result
            return []
        if self.stop == self.total:
            return [{"latents": x} for x in split(latents)]  # as a one-call diffuse returns them
        out = [{k: v for k, v in t.items() if not k.startswith(CHUNK)} for t in self.embeddings]
        for i, x in enumerate(_split(latents, n)):
            out[i][STEP] = np.array(self.stop, dtype=np.int64)
            out[i].update(_encode(LATENTS, latents, x))
            out[i][RNG] = self.generators[i].get_state().numpy().copy()
            out[i][SCHEDULER_CLASS] = np.array(type(self._window._base).__name__)
        for key, tensor in self._window.saved_state().items():
            if tensor.ndim > 0:  # per request: split along the batch
                for i, x in enumerate(_split(tensor, n)):
                    out[i].update(_encode(key, tensor, x))
            else:
                for o in out:
                    o.update(_encode(key, tensor, tensor.cpu().numpy().copy()))
        return out


class _WindowedScheduler:
    """The pipeline's scheduler as one chunk's loop sees it (in place of it while the chunk runs).

    - `set_timesteps` sets the whole schedule, then the step index to the chunk's start and the
      carried state; `set_begin_index(i)` (pipelines call it with 0) counts from the start;
    - `timesteps` are the chunk's only, so the pipeline's loop runs just those; the scheduler
      itself keeps all of them (multistep solvers look at how many steps are left);
    - `init_noise_sigma` is 1 when resuming: the saved latents are scaled already;
    - `step` is the scheduler's; for CogVideoX's DPM scheduler it also passes the previous step's
      x0 prediction and timestep, which the pipeline keeps in loop locals;
    - everything else, `isinstance` included, is the scheduler's.
    """

    def __init__(self, scheduler, chunk: DenoiseChunk, shards: bool):
        base = _diffusers_scheduler(scheduler)
        kinds = CARRIED_STATE.get(type(base).__name__)
        if kinds is None:
            raise ConfigError(f"{type(base).__name__} cannot run a range of steps: the state its step() keeps "
                              f"is not known; chunkable schedulers: {sorted(CARRIED_STATE)}")
        if getattr(base.config, "stochastic_sampling", False) or str(
                getattr(base.config, "algorithm_type", "")).startswith("sde"):
            raise ConfigError(f"{type(base).__name__} with this config draws noise from torch's global RNG in "
                              "step(): a range of steps cannot be resumed exactly")
        if shards and any(k != "int" for k in kinds.values()):
            raise ConfigError(f"{type(base).__name__} keeps per-step tensors, which sequence parallelism splits "
                              "across ranks: run its ranges of steps at width 1")
        put = functools.partial(object.__setattr__, self)
        put("_scheduler", scheduler)
        put("_base", base)
        put("_chunk", chunk)
        put("_kinds", kinds)
        put("_prev_x0", None)
        # Pipelines read these signatures (which step kwargs to pass, whether sigmas are accepted).
        put("set_timesteps", _with_signature_of(scheduler.set_timesteps, self._set_timesteps))
        if _PREV_X0 in kinds:
            put("step", _with_signature_of(scheduler.step, self._step_passing_prev_x0))

    def _set_timesteps(self, *args, **kwargs) -> None:
        base, chunk = self._base, self._chunk
        self._scheduler.set_timesteps(*args, **kwargs)
        if len(base.timesteps) != chunk.total:
            raise ConfigError(f"{type(base).__name__} makes {len(base.timesteps)} timesteps for "
                              f"{chunk.total} steps: a range of steps needs one timestep per step")
        if hasattr(base, "set_begin_index"):  # CogVideoX's schedulers step by timestep, keep no index
            base.set_begin_index(chunk.start)
        if chunk.start > 0:
            self._restore(chunk.embeddings)

    def _step_passing_prev_x0(self, *args, **kwargs):
        """CogVideoXDPMScheduler.step, given the previous step's x0 prediction and timestep on the
        first step of a resumed chunk (where the pipeline's loop locals start empty)."""
        bound = inspect.signature(self._scheduler.step).bind(*args, **kwargs)
        if bound.arguments.get(_PREV_X0) is None and self._prev_x0 is not None:
            bound.arguments[_PREV_X0] = self._prev_x0
            bound.arguments["timestep_back"] = self._base.timesteps[self._chunk.start - 1]
        out = self._scheduler.step(*bound.args, **bound.kwargs)
        object.__setattr__(self, "_prev_x0", out[1])  # (prev_sample, pred_original_sample)
        return out

    @property
    def __class__(self):  # isinstance(pipe.scheduler, CogVideoXDPMScheduler) in the pipelines
        return type(self._base)

    @property
    def timesteps(self):
        return self._base.timesteps[self._chunk.start : self._chunk.stop]

    @property
    def init_noise_sigma(self):
        return 1.0 if self._chunk.start > 0 else self._base.init_noise_sigma

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._base.set_begin_index(self._chunk.start + begin_index)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scheduler, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._scheduler, name, value)

    def _get(self, name: str) -> Any:
        return self._prev_x0 if name == _PREV_X0 else getattr(self._base, name, None)

    def _set(self, name: str, value: Any) -> None:
        if name == _PREV_X0:
            object.__setattr__(self, "_prev_x0", value)
        else:
            setattr(self._base, name, value)

    def saved_state(self) -> dict[str, "torch.Tensor"]:
        """The carried state after the chunk, flat: `chunk/scheduler/<field>[/<i>]` -> tensor
        (latents-shaped ones batched, shared counters 0-d). Missing entries mean "as set_timesteps
        leaves it" (None, or the field not set yet)."""
        import torch

        out = {}
        for name, kind in self._kinds.items():
            value = self._get(name)
            key = SCHEDULER + name
            if kind == "int":
                if value is not None:
                    out[key] = torch.tensor(int(value), dtype=torch.int64)
            elif kind == "sample":
                if value is not None:
                    out[key] = value
            else:  # a list of tensors or None
                for i, item in enumerate(value or ()):
                    if item is not None:
                        out[f"{key}/{i}"] = item if kind == "samples" else torch.as_tensor(item).reshape(())
        return out

    def _restore(self, tensors: list[dict[str, np.ndarray]]) -> None:
        """Put the saved state of the group's requests back (after set_timesteps reset it)."""
        device = self._chunk.device
        first = tensors[0]
        for name, kind in self._kinds.items():
            key = SCHEDULER + name
            if kind == "int":
                if key in first:
                    self._set(name, int(_shared(tensors, key)))
            elif kind == "sample":
                if key in first:
                    self._set(name, _stack(tensors, key, device))
            else:
                value = list(self._get(name))
                for i in range(len(value)):
                    k = f"{key}/{i}"
                    if k in first:
                        value[i] = _stack(tensors, k, device) if kind == "samples" else _scalar(tensors, k, device)
                self._set(name, value)


def _with_signature_of(original, method):
    """`method`, showing `original`'s signature to `inspect.signature`."""

    @functools.wraps(original)
    def call(*args, **kwargs):
        return method(*args, **kwargs)

    return call


def _diffusers_scheduler(scheduler):
    """The diffusers scheduler under any wrappers (xfuser wraps it in `.module`)."""
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    while not isinstance(scheduler, SchedulerMixin) and hasattr(scheduler, "module"):
        scheduler = scheduler.module
    return scheduler


def _pipeline_holding_scheduler(pipe):
    """The diffusers pipeline whose `scheduler` attribute the loop reads (under xfuser's wrapper
    and the executor's adapter, the wrapped one)."""
    return getattr(pipe, "diffusers_pipeline", None) or pipe


def _shards_latents(pipe) -> bool:
    return bool(getattr(pipe, "shards_latents", False))


def _encode(key: str, like: "torch.Tensor", array: np.ndarray) -> dict[str, np.ndarray]:
    """`key` -> numpy (already float32 where the tensor was bfloat16, recorded next to it)."""
    import torch

    if like.dtype == torch.bfloat16:
        return {key: array, key + _DTYPE: np.array("bfloat16")}
    return {key: array}


def _split(t: "torch.Tensor", n: int) -> list[np.ndarray]:
    import torch

    if t.shape[0] != n:
        raise ConfigError(f"a chunk state tensor of shape {tuple(t.shape)} does not split into {n} requests "
                          "(sequence parallelism may have split it across ranks)")
    dtype = torch.float32 if t.dtype == torch.bfloat16 else t.dtype
    array = t.detach().to("cpu", dtype).numpy()
    return [array[i : i + 1].copy() for i in range(n)]


def _stack(tensors: list[dict[str, np.ndarray]], key: str, device) -> "torch.Tensor":
    import torch

    batch = torch.from_numpy(np.concatenate([t[key] for t in tensors], axis=0)).to(device)
    return batch.to(torch.bfloat16) if key + _DTYPE in tensors[0] else batch


def _shared(tensors: list[dict[str, np.ndarray]], key: str) -> np.ndarray:
    """A value every request of the group must agree on (a step counter, a timestep)."""
    values = [t[key] for t in tensors]
    if any(not np.array_equal(values[0], v) for v in values[1:]):
        raise InvalidRequestError("tensors", f"the requests of one batch disagree on {key!r}")
    return values[0]


def _scalar(tensors: list[dict[str, np.ndarray]], key: str, device) -> "torch.Tensor":
    import torch

    return torch.from_numpy(np.array(_shared(tensors, key))).to(device)
