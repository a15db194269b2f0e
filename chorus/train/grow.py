"""Growing a trained UNet into a larger one that starts as exactly the same function.

A recipe may add to a trained model what it lacked: attention at a finer level, a second text
encoder (a wider cross-attention context, eDiff-I's ensemble), SDXL's added embedding of sizes and
crops. `grow_unet(new, base_state)` copies every weight whose name and shape match, copies a
linear layer whose input grew (to_k / to_v reading a wider context) into its first columns with
zeros in the new ones, and zero-initialises the output of each new path — the projection out of a
new transformer (out = x + proj_out(…)) and the last layer of a new added embedding — so at step 0

    grown(x, t, [c_old, c_new], sizes) = base(x, t, c_old)

(ControlNet's zero-convolution idea). Training then opens the new paths from zero.
"""
from __future__ import annotations

import torch

from chorus.errors import ChorusError


@torch.no_grad()
def grow_unet(new: torch.nn.Module, base_state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Load `base_state` into `new` where it fits; zero the outputs of new paths. Returns counts."""
    state = new.state_dict()
    copied = widened = zeroed = 0
    new_keys = []
    for key, param in state.items():
        old = base_state.get(key)
        if old is not None and old.shape == param.shape:
            param.copy_(old.to(param.dtype))
            copied += 1
        elif old is not None and old.dim() == 2 and param.dim() == 2 and old.shape[0] == param.shape[0] \
                and old.shape[1] < param.shape[1]:
            param.zero_()
            param[:, :old.shape[1]].copy_(old.to(param.dtype))   # the old context comes first
            widened += 1
        elif old is not None:
            raise ChorusError(f"Cannot grow {key}: the base has shape {tuple(old.shape)}, the new UNet "
                              f"{tuple(param.shape)} (only new modules and wider inputs can be grown).")
        else:
            new_keys.append(key)
    new_modules = {k.rsplit(".", 1)[0] for k in new_keys}
    for key in new_keys:
        module = key.rsplit(".", 1)[0]
        # the output of a new transformer (…attentions.N.proj_out) or of a new added embedding
        if module.endswith("proj_out") and _is_new_transformer(module, new_modules) \
                or module == "add_embedding.linear_2":
            state[key].zero_()
            zeroed += 1
    missing = sorted(k for k in base_state if k not in state)
    if missing:
        raise ChorusError(f"The grown UNet lacks {len(missing)} weights of the base (e.g. {missing[0]}): a grown "
                          "model may add modules, not remove them.")
    return {"copied": copied, "widened": widened, "zeroed": zeroed, "new": len(new_keys)}


def _is_new_transformer(proj_out: str, new_modules: set[str]) -> bool:
    """proj_out of a transformer whose proj_in is new too (so the whole transformer is new)."""
    return proj_out[: -len("proj_out")] + "proj_in" in new_modules
