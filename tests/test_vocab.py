"""The ground floor (trident_rs.vocab): one definition of each shared name."""
import math
import random

import numpy as np
import pytest

from trident_rs.vocab import STAGES, DeploymentKey, Shape, error_body, percentile


def test_deployment_key_names_and_parses_back():
    for stage in STAGES:
        for width in (1, 2, 8, 64):
            key = DeploymentKey(stage, width)
            assert DeploymentKey.parse(key.name) == key
    assert DeploymentKey("diffuse", 4).name == "diffuse-w4"
    group = DeploymentKey.of(STAGES, 2)  # pipeline-level group: all stages on the same GPUs
    assert group.name == "encode+diffuse+decode-w2" and DeploymentKey.parse(group.name).stages == STAGES


@pytest.mark.parametrize("bad", ["diffuse", "diffuse-w", "-w4", "diffuse-wx", "diffuse-w-1", ""])
def test_deployment_key_rejects_other_strings(bad):
    with pytest.raises(ValueError):
        DeploymentKey.parse(bad)


def test_shape_key_round_trips():
    assert Shape.parse(Shape(720, 1280, 129).key) == Shape(720, 1280, 129)
    assert Shape.parse("512-512") == Shape(512, 512, 1)


def test_percentile_is_numpys_linear_definition_to_the_bit():
    rng = random.Random(0)
    for n in (1, 2, 5, 100, 1001):
        xs = [rng.expovariate(1.0) for _ in range(n)]
        for q in (0, 37.5, 50, 90, 95, 99, 100):
            assert percentile(xs, q) == float(np.percentile(xs, q))
    assert math.isnan(percentile([], 50))


def test_a_percentile_reaching_a_request_never_served_is_infinite():
    xs = [1.0] * 18 + [math.inf] * 2  # 10% never finished
    assert percentile(xs, 50) == 1.0 and percentile(xs, 89) == 1.0
    assert percentile(xs, 95) == math.inf and percentile(xs, 100) == math.inf
    assert percentile(xs, 90) == math.inf  # between the last finished one and the first never served


def test_error_body_is_openai_shaped():
    assert error_body("bad size", "InvalidRequestError", 422, "size") == {
        "error": {"message": "bad size", "type": "InvalidRequestError", "param": "size", "code": 422}}
