"""The request model of GenARM guidance: validation and per-prompt resolution."""

import pytest

from genarm_vllm.guidance import check_guidance, resolve_guidance, row_guidance


@pytest.mark.parametrize(
    "beta, weights, match",
    [
        (0.0, [1.0], "beta must be a finite number > 0"),
        (-1.0, [1.0], "beta must be a finite number > 0"),
        (float("nan"), [1.0], "beta must be a finite number > 0"),
        (float("inf"), [1.0], "beta must be a finite number > 0"),
        ("1", [1.0], "beta must be a finite number > 0"),
        (1.0, [1.0, 2.0], "one entry per reward model"),
        (1.0, [float("nan")], "finite numbers"),
        (1.0, [float("inf")], "finite numbers"),
        (1.0, "1", "list of 1 finite numbers"),
        (1e-300, [1.0], r"beta must be >= 1e-15 .*overflow float32"),  # passes "> 0"
        (1.0, [1e39], r"weights must lie in \[-1e\+15, 1e\+15\]"),  # inf in float32
    ],
)
def test_bad_guidance_raises(beta, weights, match):
    with pytest.raises(ValueError, match=match):
        check_guidance(beta, weights, 1)


def test_resolve_guidance_forms():
    assert resolve_guidance(None, 2, 1.0, [1.0]) == [None, None]
    assert resolve_guidance({"beta": 0.5}, 2, 1.0, [1.0]) == [(0.5, [1.0])] * 2
    assert resolve_guidance([None, {"weights": [2]}], 2, 1.0, [1.0]) == [None, (1.0, [2.0])]
    with pytest.raises(ValueError, match="one per prompt"):
        resolve_guidance([None], 2, 1.0, [1.0])
    with pytest.raises(ValueError, match=r"guidance\[1\]: beta"):
        resolve_guidance([None, {"beta": -1}], 2, 1.0, [1.0])
    with pytest.raises(ValueError, match="keys 'beta' and/or 'weights'"):
        resolve_guidance({"betta": 1}, 1, 1.0, [1.0])


def test_row_guidance():
    assert row_guidance({"prompt": "x"}, 2) is None
    assert row_guidance({"prompt": "x", "beta": 2, "weights": [1, 0]}, 2) == {
        "beta": 2.0, "weights": [1.0, 0.0]}
    with pytest.raises(ValueError, match="one entry per reward model"):
        row_guidance({"weights": [1]}, 2)
