"""Diffuse over a range of steps: a request's loop run in chunks equals one call.

Between chunks the payload goes through pickle (as Ray's object store would carry it) and holds
numpy arrays only. Covered: every family's tiny model with its own scheduler, a multistep
solver's history (Wan's UniPC; SD3 with DPM-Solver++), CogVideoX1.5's DPM scheduler (x0 history
kept in the pipeline's loop, noise drawn from each request's generator in every step), batches
whose requests keep their own state, chunks alternating width 1 and width 2, and bad input.
"""
from __future__ import annotations

import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_sequence_parallel import _width2_replica, needs_xfuser

from trident_rs.errors import ConfigError, InvalidRequestError
from trident_rs.executors.base import StagePayload, build_executor
from trident_rs.models.chunking import LATENTS, RNG, SCHEDULER, SCHEDULER_CLASS, STEP
from trident_rs.models.spec import get_spec
from trident_rs.request import GenerationParams

STEPS = 4
SPLITS = [(1, 3), (2, 2), (1, 1, 1, 1)]
TOL = 1e-5


def _flow_dpm(scheduler):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def _cogvideox_dpm(scheduler):
    from diffusers import CogVideoXDPMScheduler

    return CogVideoXDPMScheduler.from_config(scheduler.config)


# case -> (model, scheduler to swap in or None, scheduler state that must travel)
CASES = {
    "sd3": ("tiny-sd3", None, set()),  # flow-matching Euler: only the step index
    "flux": ("tiny-flux", None, set()),  # packed latents
    "cogvideox": ("tiny-cogvideox", None, set()),  # DDIM, padded latent frames
    "hunyuanvideo": ("tiny-hunyuanvideo", None, set()),
    "wan": ("tiny-wan", None, {"model_outputs/0", "model_outputs/1", "last_sample", "lower_order_nums"}),  # UniPC
    "sd3-dpm": ("tiny-sd3", _flow_dpm, {"model_outputs/1", "lower_order_nums"}),
    "cogvideox-dpm": ("tiny-cogvideox", _cogvideox_dpm, {"old_pred_original_sample"}),
}
_ENCODED: dict[str, list[StagePayload]] = {}


def _params(model: str, **kw) -> GenerationParams:
    extra = {"num_frames": 9} if get_spec(model).is_video else {}
    fields = {"prompt": "a red cube", "steps": STEPS, "seed": 0, **extra, **kw}
    return GenerationParams(model=model, **fields).resolved()


def _encoded(model: str) -> list[StagePayload]:
    """Two requests (different prompts and seeds) after encode."""
    if model not in _ENCODED:
        params = [_params(model), _params(model, prompt="a blue cat", seed=5)]
        _ENCODED[model] = build_executor("diffusers", model, "encode").run([StagePayload(p) for p in params])
    return _ENCODED[model]


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    model, swap, carried = CASES[request.param]
    diffuse = build_executor("diffusers", model, "diffuse")
    if swap is not None:
        diffuse.pipe.scheduler = swap(diffuse.pipe.scheduler)
    encoded = _encoded(model)
    return diffuse, encoded, diffuse.run(encoded), carried


def _through_object_store(payloads: list[StagePayload]) -> list[StagePayload]:
    for p in payloads:
        bad = {k: type(v).__name__ for k, v in p.tensors.items() if not isinstance(v, np.ndarray)}
        assert not bad, f"non-numpy tensors in the payload: {bad}"
    return pickle.loads(pickle.dumps(payloads))


def _run_chunks(executors, payloads: list[StagePayload], split: tuple[int, ...]) -> list[StagePayload]:
    """Run `split` chunk sizes one after another, the i-th on executors[i % len(executors)]."""
    start = 0
    for i, n in enumerate(split):
        payloads = [StagePayload(p.params, p.tensors, p.meta, step_range=(start, start + n)) for p in payloads]
        payloads = executors[i % len(executors)].run(payloads)
        start += n
        if start < STEPS:
            for p in payloads:
                assert int(p.tensors[STEP]) == start and p.meta["diffuse_steps"] == (start - n, start)
            payloads = _through_object_store(payloads)
    return payloads


def _max_diff(a: list[StagePayload], b: list[StagePayload]) -> float:
    return max(float(np.abs(x.tensors["latents"] - y.tensors["latents"]).max()) for x, y in zip(a, b))


@pytest.mark.parametrize("split", SPLITS, ids=["1+3", "2+2", "1+1+1+1"])
def test_chunks_equal_one_call(case, split):
    diffuse, encoded, one_call, _ = case
    chunked = _run_chunks([diffuse], encoded, split)
    for want, have in zip(one_call, chunked):
        assert set(have.tensors) == {"latents"}  # the last chunk's output is one-call diffuse's
        assert have.tensors["latents"].dtype == np.float32
        assert have.tensors["latents"].shape == want.tensors["latents"].shape
    assert _max_diff(one_call, chunked) <= TOL
    # the two requests of the batch kept their own state (the comparison is not vacuous)
    assert np.abs(chunked[0].tensors["latents"] - chunked[1].tensors["latents"]).max() > 1e-3


def test_chunk_state_is_numpy_and_needed(case):
    """The partial payload holds the embeddings plus the chunk state, all numpy; dropping the
    scheduler's carried state (or the generator's) changes the result where the scheduler uses it."""
    diffuse, encoded, one_call, carried = case
    first = _through_object_store(diffuse.run([StagePayload(p.params, p.tensors, step_range=(0, 2)) for p in encoded]))
    p0 = first[0]
    assert set(encoded[0].tensors) < set(p0.tensors)  # the embeddings travel on
    assert p0.tensors[LATENTS].shape == diffuse.family.latents_shape(diffuse.pipe, p0.params)
    assert p0.tensors[LATENTS].shape == one_call[0].tensors["latents"].shape
    assert p0.tensors[RNG].dtype == np.uint8
    state = {k[len(SCHEDULER):] for k in p0.tensors if k.startswith(SCHEDULER)}
    assert carried <= state

    def finish(drop: str) -> float:
        rest = [StagePayload(p.params, {k: v for k, v in p.tensors.items() if not k.startswith(drop)},
                             step_range=(2, STEPS)) for p in first]
        return _max_diff(one_call, diffuse.run(rest))

    if carried:
        assert finish(SCHEDULER) > 1e-3
    if "old_pred_original_sample" in carried:  # CogVideoX's DPM scheduler draws noise each step
        other = torch.Generator().manual_seed(123).get_state().numpy()
        fresh = [StagePayload(p.params, {**p.tensors, RNG: other}, step_range=(2, STEPS)) for p in first]
        assert _max_diff(one_call, diffuse.run(fresh)) > 1e-3


def test_bfloat16_latents_travel_exactly():
    """numpy has no bfloat16: the latents travel as float32 (lossless) and are resumed in bfloat16,
    which CogVideoX's pipeline (it does not cast given latents) needs."""
    model = "tiny-cogvideox"
    diffuse = build_executor("diffusers", model, "diffuse", dtype=torch.bfloat16)
    encoded = _encoded(model)[:1]
    one_call = diffuse.run(encoded)
    first = _run_chunks([diffuse], encoded, (2,))
    assert first[0].tensors[LATENTS].dtype == np.float32 and str(first[0].tensors[LATENTS + ".dtype"]) == "bfloat16"
    assert _max_diff(one_call, _run_chunks([diffuse], encoded, (2, 2))) <= TOL


def test_progress_counts_the_whole_loop():
    seen = []
    model = "tiny-flux"
    diffuse = build_executor("diffusers", model, "diffuse", on_step=lambda i, n: seen.append((i, n)))
    p = _encoded(model)[:1]
    _run_chunks([diffuse], p, (1, 3))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


# --- bad input --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd3_partial():
    diffuse = build_executor("diffusers", "tiny-sd3", "diffuse")
    encoded = _encoded("tiny-sd3")[:1]
    return diffuse, encoded[0], diffuse.run([StagePayload(encoded[0].params, encoded[0].tensors, step_range=(0, 1))])[0]


@pytest.mark.parametrize("step_range, match", [
    ((-1, 2), "within 0 <= a < b <= steps = 4"),
    ((2, 2), "within"),
    ((0, 5), "within"),
    ((3, 1), "within"),
    ((0.5, 2), "two integers"),
    ("ab", "two integers"),
    ((1, 2, 3), "a pair"),
])
def test_bad_ranges(sd3_partial, step_range, match):
    diffuse, encoded, _ = sd3_partial
    with pytest.raises(InvalidRequestError, match=match):
        diffuse.run([StagePayload(encoded.params, encoded.tensors, step_range=step_range)])


def _with(tensors, **changes):
    out = dict(tensors)
    for k, v in changes.items():
        key = {"latents": LATENTS, "rng": RNG, "step": STEP}[k]
        if v is None:
            out.pop(key)
        else:
            out[key] = v
    return out


@pytest.mark.parametrize("change, step_range, match", [
    ("none", (1, 4), "starts at step 1 but the payload carries no chunk state"),
    ("as is", (2, 4), "starts at step 2 but the payload carries a chunk state at step 1"),
    ("as is", (0, 4), "starts at step 0 but the payload carries a chunk state at step 1"),
    ("as is", None, "starts at step 0"),
    ("no latents", (1, 4), "needs 'chunk/latents'"),
    ("no rng", (1, 4), "needs 'chunk/rng_state'"),
    ("other scheduler", (1, 4), "the chunk state is UniPCMultistepScheduler's; this executor runs "
                                "FlowMatchEulerDiscreteScheduler"),
    ("latents shape", (1, 4), r"'chunk/latents' has shape \(1, 16, 4, 4\); this request's latents are \(1, 16, 8, 8\)"),
    ("latents list", (1, 4), "must be a numpy array"),
    ("rng dtype", (1, 4), "'chunk/rng_state' must be uint8"),
    ("step kind", (1, 4), "must be a 0-d integer numpy array"),
])
def test_bad_chunk_state(sd3_partial, change, step_range, match):
    diffuse, encoded, partial = sd3_partial
    t = partial.tensors
    tensors = {
        "none": encoded.tensors,
        "as is": t,
        "no latents": _with(t, latents=None),
        "no rng": _with(t, rng=None),
        "latents shape": _with(t, latents=np.zeros((1, 16, 4, 4), np.float32)),
        "latents list": _with(t, latents=t[LATENTS].tolist()),
        "rng dtype": _with(t, rng=t[RNG].astype(np.int64)),
        "other scheduler": {**t, SCHEDULER_CLASS: np.array("UniPCMultistepScheduler")},
        "step kind": _with(t, step=np.array([1.0])),
    }[change]
    with pytest.raises(InvalidRequestError, match=match):
        diffuse.run([StagePayload(partial.params, tensors, step_range=step_range)])


@pytest.mark.parametrize("scheduler, match", [
    ("EulerDiscreteScheduler", "the state its step\\(\\) keeps is not known"),
    ("stochastic FlowMatchEulerDiscreteScheduler", "draws noise from torch's global RNG"),
])
def test_schedulers_that_cannot_resume_exactly_are_refused(scheduler, match):
    import diffusers

    diffuse = build_executor("diffusers", "tiny-sd3", "diffuse")
    name = scheduler.split()[-1]
    options = {"stochastic_sampling": True} if scheduler.startswith("stochastic") else {}
    diffuse.pipe.scheduler = getattr(diffusers, name).from_config(diffuse.pipe.scheduler.config, **options)
    encoded = _encoded("tiny-sd3")[:1]
    assert diffuse.run(encoded)[0].tensors["latents"].shape == (1, 16, 8, 8)  # one call: as ever
    with pytest.raises(ConfigError, match=match):
        diffuse.run([StagePayload(encoded[0].params, encoded[0].tensors, step_range=(0, 2))])


def test_sequence_parallel_refuses_carried_scheduler_tensors():
    """Under xfuser the latents (and so a multistep solver's history) are split across ranks."""
    from diffusers import UniPCMultistepScheduler

    from trident_rs.executors.sequence_parallel import _XFuserCallAdapter
    from trident_rs.models.chunking import DenoiseChunk

    class XfuserLike:  # what the adapter wraps: xfuser's pipeline wrapper, its diffusers pipeline in .module
        module = SimpleNamespace(scheduler=UniPCMultistepScheduler())

    adapter = _XFuserCallAdapter(XfuserLike(), batches_cfg=True)
    chunk = DenoiseChunk(adapter, [_params("tiny-sd3")], [{}], step_range=(0, 2))
    with pytest.raises(ConfigError, match="per-step tensors, which sequence parallelism splits across ranks"):
        with chunk:
            pass
    assert isinstance(XfuserLike.module.scheduler, UniPCMultistepScheduler)  # left as it was


def test_ranks_without_the_result_return_no_payloads():
    """xfuser's CogVideoX returns a list of Nones on ranks that hold no latents (SD3, FLUX: None)."""
    from trident_rs.executors.sequence_parallel import _XFuserCallAdapter

    for result in (None, ([None, None],)):
        (out,) = _XFuserCallAdapter(lambda **kw: result, batches_cfg=False)(guidance_scale=6.0)
        assert out.shape == (0,)


# --- chunks alternating width 1 and width 2 (xfuser over gloo) ----------------------------------

@pytest.fixture(scope="module")
def ray_two_fake_gpus():  # as tests/test_sequence_parallel.py's
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


class _Remote:
    """A width-2 replica actor as an executor."""

    def __init__(self, ray, replica):
        self.ray, self.replica = ray, replica

    def run(self, batch):
        return self.ray.get(self.replica.run.remote(batch), timeout=300)


@needs_xfuser
@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"], ids=["sd3-cfg2", "flux-ulysses2"])
def test_chunks_alternating_widths_equal_width1(ray_two_fake_gpus, model):
    ray = ray_two_fake_gpus
    encoded = _encoded(model)
    w1 = build_executor("diffusers", model, "diffuse")
    one_call = w1.run(encoded)
    replica, close = _width2_replica(ray, model)
    try:
        chunked = _run_chunks([w1, _Remote(ray, replica), w1], encoded, (1, 2, 1))  # w1 -> w2 -> w1
    finally:
        close()
    assert _max_diff(one_call, chunked) <= TOL
