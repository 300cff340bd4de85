"""Top-1/top-5/loss over a whole dataset, exact under several processes.

Shared by train.py (per-epoch evaluation of the model and its EMA) and eval.py, so that the number a training
run logs and the number eval.py prints for the same weights come from the same code.
"""

import time

import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate(model, loader, accelerator, *, amp_dtype=None, loss_fn=None, progress=None) -> dict:
    """Evaluate `model` on every sample of `loader` exactly once.

    Under DDP the prepared loader pads the last batch so every rank has work; `gather_for_metrics` drops
    those duplicates again, so `num_images` equals the dataset size. Per-sample results are gathered (not
    per-rank averages) to keep the counts exact.

    amp_dtype: autocast dtype (torch.bfloat16/float16) or None for full precision.
    loss_fn: maps (logits, targets) to per-sample losses; cross-entropy by default.
    progress: optional callable(batch_index) for a progress bar.
    """
    loss_fn = loss_fn or (lambda logits, target: F.cross_entropy(logits, target, reduction="none"))
    device_type = accelerator.device.type
    was_training = model.training
    model.eval()

    # Per-batch sums stay on the device until the end, so that no batch waits for the host.
    batch_sums, num_images = [], 0
    start = time.perf_counter()
    for batch_index, (images, targets) in enumerate(loader):
        with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[-1])
        topk = logits.topk(k, dim=-1).indices  # [B, k]
        hits = topk.eq(targets[:, None])  # [B, k]
        per_sample = torch.stack(
            [hits[:, 0].float(), hits.any(dim=-1).float(), loss_fn(logits, targets).float()], dim=1
        )  # [B, 3]: top-1 hit, top-5 hit, loss
        per_sample = accelerator.gather_for_metrics(per_sample)
        batch_sums.append(per_sample.sum(dim=0))  # [3]
        num_images += per_sample.shape[0]
        if progress is not None:
            progress(batch_index)
    # Totals in float64 on the host: exact counts however many batches.
    totals = torch.stack(batch_sums).cpu().double().sum(dim=0) if batch_sums else torch.zeros(3)
    correct1, correct5, loss_sum = totals.tolist()  # waits for the last batch, so before the clock stops
    elapsed = time.perf_counter() - start
    model.train(was_training)

    if num_images == 0:
        raise ValueError("evaluate: the loader yielded no images; check that the evaluation split is not empty")
    return {
        "top1": 100.0 * correct1 / num_images,
        "top5": 100.0 * correct5 / num_images,
        "loss": loss_sum / num_images,
        "num_images": int(num_images),
        "images_per_sec": num_images / elapsed if elapsed > 0 else float("nan"),
    }
