"""Issue 24, item 7: property-based tests (hypothesis) at the boundaries where users type things. Each property
either gets a clear UserError before any work or a value the run can use; never another exception. Example budgets
are small and fixed (``derandomize``: the same examples every run, so CI is deterministic)."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import compose_cfg

PROFILE = settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

# key -> the range the run may use (the schema's bounds, restated here as the property's oracle)
NUMERIC = {
    "sampler.num_inference_steps": (1, math.inf, int),
    "sampler.batch_size": (1, math.inf, int),
    "sampler.guidance_scale": (0, math.inf, float),
    "sampler.eta": (0, 1, float),
    "seed": (0, 2**32 - 1, int),
    "dataset.p_two": (0, 1, float),
    "dataset.num_images": (1, math.inf, int),
    "tracking.connect_timeout_s": (1e-300, math.inf, float),
}

values = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "-0.0", "0x10", "true", "null", "", "1_000", "'7'", "[1]", "{a: 1}"]),
)


@PROFILE
@given(key=st.sampled_from(sorted(NUMERIC)), value=values)
def test_a_typed_number_is_used_in_range_or_refused_naming_its_key(key, value):
    from omegaconf import OmegaConf
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from pipeline.errors import UserError

    text = repr(value) if isinstance(value, float) else str(value)
    try:
        cfg = compose_cfg([f"{key}={text}"])
    except UserError as e:
        assert key in str(e), str(e)
        return
    except (HydraException, OmegaConfBaseException) as e:  # Hydra's own message for a value of the wrong type
        assert key.split(".")[-1] in str(e) or text in str(e), str(e)
        return
    lo, hi, _ = NUMERIC[key]
    got = OmegaConf.select(cfg, key)
    assert isinstance(got, (int, float)) and not isinstance(got, bool) and math.isfinite(got), (key, text, got)
    assert lo <= got <= hi, (key, text, got)
