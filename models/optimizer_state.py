"""An optimizer's state as flat named tensors plus JSON metadata, so training checkpoints can store it as safetensors
(which holds only a flat name -> tensor map) next to a JSON file."""

from __future__ import annotations

import torch


def flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors named "{param_id}.{state_name}", {"param_groups": ...}) for `unflatten_optimizer`."""
    sd = opt.state_dict()
    tensors = {}
    for pid, state in sd["state"].items():
        for name, value in state.items():
            tensors[f"{pid}.{name}"] = torch.as_tensor(value).clone().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def unflatten_optimizer(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    """Load into `opt` the state that `flatten_optimizer` split into `tensors` and `meta`."""
    state: dict = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
