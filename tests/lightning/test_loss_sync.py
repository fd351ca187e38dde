"""Loss normalization across ranks: 2 processes x 2 images give the loss and gradients of 1 process x 4
images (the normalizers are averaged over ranks, DDP averages gradients), and DDP needs no
``find_unused_parameters`` when one rank's batch has no objects at all."""

from __future__ import annotations

import os
import tempfile
import time
from datetime import timedelta
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from fcos_lightning.lightning.module import FCOSLitModule
from fcos_lightning.modeling.backbones import TimmBackbone
from fcos_lightning.modeling.detector import FCOS
from fcos_lightning.modeling.head import FCOSHead

WORLD = 2
CATEGORIES = {"cat_ids": [1, 2, 3], "names": ["a", "b", "c"]}


def make_module() -> FCOSLitModule:
    """A small FCOS with a GN head and a FrozenBN backbone (no batch statistics), identical in every process."""
    torch.manual_seed(0)
    backbone = TimmBackbone(
        "resnet18",
        out_indices=(2, 3, 4),
        norm="FrozenBN",
        freeze_at=0,
        model_kwargs={"channels": [16, 32, 64, 128], "stem_width": 16},
    )
    head = partial(FCOSHead, norm="GN", num_cls_convs=1, num_box_convs=1)
    model = FCOS(backbone, head, num_classes=3, fpn_channels=32, top_levels=0, sizes_of_interest=(64, 128))
    return FCOSLitModule(model, CATEGORIES)


def make_batch(num_images: int = 4, size: int = 128):
    """Images of one size (no padding differences between the split and the whole batch) with 1-3 boxes."""
    g = torch.Generator().manual_seed(1)
    images = torch.rand(num_images, 3, size, size, generator=g) * 255
    sizes = torch.full((num_images, 2), size)
    targets = []
    for _ in range(num_images):
        n = int(torch.randint(1, 4, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * size * 0.5
        wh = 16 + torch.rand(n, 2, generator=g) * size * 0.45
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(0, 3, (n,), generator=g)})
    return images, sizes, targets


def loss_and_grads(module: FCOSLitModule, network, images, sizes, targets) -> tuple[dict, dict]:
    outputs = network(images, sizes)
    losses = module.compute_loss(outputs, targets)
    losses["loss"].backward()
    grads = {n: p.grad.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    return {k: v.detach() for k, v in losses.items()}, grads


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        module = make_module()
        ddp = DistributedDataParallel(module.model)  # find_unused_parameters=False, as Lightning's default
        images, sizes, targets = make_batch()
        part = slice(2 * rank, 2 * rank + 2)
        losses, grads = loss_and_grads(module, ddp, images[part], sizes[part], targets[part])
        for value in losses.values():
            dist.all_reduce(value)
            value /= WORLD  # the DDP-averaged loss
        result = {"losses": losses, "grads": grads}

        # Rank 1's images have no objects: no positives there, the box/centerness branches get zero loss.
        if rank == 1:
            targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 4
        optimizer = torch.optim.SGD(module.model.parameters(), lr=1e-3)
        missing = []
        for _ in range(3):  # a parameter without gradient would fail DDP's reduction at the next step
            optimizer.zero_grad(set_to_none=True)
            outputs = ddp(images[part], sizes[part])
            module.compute_loss(outputs, targets[part])["loss"].backward()
            missing += [n for n, p in module.model.named_parameters() if p.requires_grad and p.grad is None]
            optimizer.step()
        result["missing_grads"] = missing
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results():
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        start = time.perf_counter()
        ctx = mp.start_processes(_worker, args=(init_file, tmp), nprocs=WORLD, join=False, start_method="spawn")
        deadline = time.monotonic() + 180
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail("2-process gloo run did not finish in 180 s (a hang in a collective?)")
        print(f"2-process run: {time.perf_counter() - start:.1f} s")
        yield [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(WORLD)]


@pytest.mark.timeout(300)
def test_two_processes_match_one_process(two_process_results, single_thread):
    module = make_module()
    losses, grads = loss_and_grads(module, module.model, *make_batch())
    ddp = two_process_results[0]
    assert ddp["losses"].keys() == losses.keys()
    loss_diff = max(abs(float(ddp["losses"][k] - losses[k])) for k in losses)
    assert ddp["grads"].keys() == grads.keys()
    grad_diff = max(float((ddp["grads"][k] - grads[k]).abs().max()) for k in grads)
    grad_scale = max(float(g.abs().max()) for g in grads.values())
    print(f"max |loss diff| {loss_diff:.2e}, max |grad diff| {grad_diff:.2e} (max |grad| {grad_scale:.2e})")
    for k in losses:
        torch.testing.assert_close(ddp["losses"][k], losses[k], atol=1e-5, rtol=1e-5)
    for k in grads:
        torch.testing.assert_close(ddp["grads"][k], grads[k], atol=1e-5, rtol=1e-5, msg=k)
    # the ranks hold the same (all-reduced) gradients
    for k in grads:
        assert torch.equal(two_process_results[0]["grads"][k], two_process_results[1]["grads"][k])


@pytest.mark.timeout(300)
def test_rank_without_objects_needs_no_find_unused_parameters(two_process_results):
    for result in two_process_results:
        assert result["missing_grads"] == []
