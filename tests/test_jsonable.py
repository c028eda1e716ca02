import json
import math

import numpy as np

from posttrain_probe.analysis.jsonable import json_safe


def test_json_safe_makes_strict_json():
    value = {
        1: [float("nan"), np.float32(0.5), (np.int64(3), float("inf"))],
        "x": {"y": -math.inf, "z": "text"},
        "n": None,
    }
    out = json_safe(value)
    assert out == {"1": [None, 0.5, [3, None]], "x": {"y": None, "z": "text"}, "n": None}
    assert type(out["1"][1]) is float and type(out["1"][2][0]) is int
    json.dumps(out, allow_nan=False)  # raises on anything left non-strict
