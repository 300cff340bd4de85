"""kat.training.ema.ModelEma: timm's ModelEmaV3 with cached tensor lists gives bitwise timm's EMA."""

import timm
import torch
from timm.utils import ModelEmaV3

from kat.training.ema import ModelEma


def test_cached_update_is_bitwise_timms():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    ours, theirs = ModelEma(model, decay=0.9, use_warmup=True), ModelEmaV3(model, decay=0.9, use_warmup=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, 6):  # the weights and BatchNorm's buffers (num_batches_tracked: an integer) move
        model(torch.randn(16, 6)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ours.update(model, step=step)
        theirs.update(model, step=step)
        for (name, a), b in zip(ours.module.state_dict().items(), theirs.module.state_dict().values()):
            assert torch.equal(a, b), f"step {step}: {name}"
    assert ours._tensors  # the cached path ran, not timm's fallback
    # After load_state_dict (in place, as resuming does) the cached lists still point at the live tensors.
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    ours.module.load_state_dict(reference)
    ours.update(model, step=100)
    assert ours.module[0].weight.data_ptr() == ours._tensors[0][0].data_ptr()


def test_falls_back_to_timm_for_other_dtypes():
    model = timm.create_model("kat_tiny", img_size=32, patch_size=8, depth=1, num_classes=4)
    ema = ModelEma(model, decay=0.5)
    ema.module.half()  # EMA kept in another dtype: timm's own (casting) update
    ema.update(model, step=1)
    assert ema._tensors is False and ema.module.head.weight.dtype == torch.float16
