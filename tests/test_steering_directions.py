"""benchmarks/steering_directions.py: its capture and its frame alignment agree with the generator's layout."""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.steering_directions import capture_all_positions, frame_series, unit
from models.generator import Generator, GeneratorConfig
from models.probes import capture_head_outputs


def test_capture_covers_every_position_and_ends_where_the_probes_read():
    torch.manual_seed(0)
    generator = Generator(GeneratorConfig.debug()).eval()
    codes = torch.randint(0, generator.cfg.card, (generator.cfg.n_codebooks, 20))
    acts = capture_all_positions(generator, codes)
    K, n_prefix = generator.cfg.n_codebooks, generator.n_prefix
    assert acts.shape[0] == n_prefix + 20 + K - 1
    assert acts.shape[1:] == (generator.cfg.n_layers, generator.cfg.n_heads, generator.cfg.dim // generator.cfg.n_heads)
    last = capture_head_outputs(generator, [codes], position="last")[0]
    np.testing.assert_allclose(acts[-1], last, rtol=1e-5, atol=1e-6)


def test_frame_series_puts_frame_s_at_the_position_that_predicts_it():
    series = frame_series(np.array([10.0, 11.0, 12.0]), n_positions=8, n_prefix=3)
    assert np.isnan(series[:3]).all() and np.isnan(series[6:]).all()
    np.testing.assert_array_equal(series[3:6], [10.0, 11.0, 12.0])
    # a series longer than the positions is cut, not wrapped
    np.testing.assert_array_equal(frame_series(np.arange(10.0), 5, 3)[3:], [0.0, 1.0])


def test_unit_normalises_the_last_axis():
    d = unit(np.array([[[3.0, 4.0], [0.0, 2.0]]]))
    np.testing.assert_allclose(np.linalg.norm(d, axis=-1), 1.0)
