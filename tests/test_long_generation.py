"""models/long_generation.py: the window loop, checked on a stand-in generator that records every call."""

import torch

from models.long_generation import generate_long


class Recorder:
    """A generator with an 8-frame context whose frames count up, so each window's input can be read back."""

    context_frames = 8

    def __init__(self):
        self.calls = []

    def generate(self, n_frames, prompt=None, condition=None, batch_size=1, seed=None, on_step=None, **kw):
        for i in range(n_frames + 1):  # decoding steps, as a delayed-codebook generator counts them
            if on_step:
                on_step(i)
        self.calls.append({"n": n_frames, "prompt": None if prompt is None else prompt.clone(), "seed": seed, **kw})
        start = 0 if prompt is None else int(prompt[0, 0, -1]) + 1
        new = torch.arange(start, start + n_frames).expand(batch_size, 2, -1)
        return new if prompt is None else torch.cat([prompt, new], dim=2)


def test_windows_continue_the_last_half_context_with_one_seed_each():
    gen, seen = Recorder(), []
    prompt = torch.arange(100, 110).expand(2, -1)  # [K=2, 10 frames]: longer than half the context
    out = generate_long(gen, 10, batch_size=3, prompt=prompt, seed=5, top_k=7, progress=lambda d, n: seen.append(d))
    # the prompt's last 4 frames (half the context) open the first window, which then has room for 4 new frames
    assert gen.calls[0]["prompt"][0, 0].tolist() == [106, 107, 108, 109] and gen.calls[0]["n"] == 4
    assert [c["n"] for c in gen.calls] == [4, 4, 2] and [c["seed"] for c in gen.calls] == [5, 6, 7]
    assert all(c["top_k"] == 7 for c in gen.calls) and gen.calls[1]["prompt"][0, 0].tolist() == [110, 111, 112, 113]
    assert out.windows == 3 and out.codes.shape == (3, 2, 10) and out.steps == []
    assert out.codes[0, 0].tolist() == list(range(110, 120)) and seen[-1] == 10
    assert seen == sorted(seen) and {4, 8} <= set(seen) and len(seen) > 3  # every step, never backwards


def test_without_a_prompt_the_first_window_fills_the_context():
    gen = Recorder()
    out = generate_long(gen, 12, batch_size=1)
    assert [c["n"] for c in gen.calls] == [8, 4] and gen.calls[0]["prompt"] is None
    assert out.codes[0, 0].tolist() == list(range(12))
