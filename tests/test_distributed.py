"""Distributed training of converted models on torch's own engines: 2 CPU processes, gloo backend,
launched with ``torch.distributed.run`` (this file is the worker script), for every registered method:

- DDP (``DistributedDataParallel``), FSDP1 (``FullyShardedDataParallel``, ``use_orig_params``, units from
  ``condify.integrations.fsdp_wrap_policy``) and FSDP2 (``condify.integrations.fully_shard``: torch's
  ``fully_shard`` on each of ``fsdp_units``, then the root) each train 3 steps, every rank on its own
  half of the batch, with ``condify.training_loss`` and ``condify.integrations.step`` (which all-reduces);
- afterwards both ranks hold the same model: the same loss on a common batch (bitwise), the same
  buffers (thresholds), and under DDP the same parameters;
- rank 0 saves a checkpoint with ``condify.save_pretrained`` (FSDP: from the full state dict); it loads
  back with the trained model's logits, bitwise (FSDP2: once the loaded weights have the contiguous
  layout FSDP2 trained them in; with the column-major ``down`` layout of dynamic-k/lte/mot they differ
  by summation order only, < 1e-6);
- for methods without per-step terms, the DDP result equals one process training on the whole batch.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from small import one_thread  # noqa: F401 (autouse; the workers run one thread each too: bitwise-equal kernels)

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
ENGINES = ("ddp", "fsdp1", "fsdp2")
STEPS = 3
LR = 1e-3


def _batch() -> torch.Tensor:
    return torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))


def _common() -> torch.Tensor:
    return torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(5))


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _train(model, rows: torch.Tensor) -> tuple[list[float], dict[str, float]]:
    """``STEPS`` AdamW steps of ``model`` (maybe wrapped) on ``rows``, with condify's terms; the losses and
    the last status of ``condify.integrations.step``."""
    import condify
    from condify.integrations import step

    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    model.train()
    losses, status = [], {}
    for _ in range(STEPS):
        loss = model(input_ids=rows, labels=rows).loss + condify.training_loss(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        status = step(model)
        losses.append(loss.item())
    return losses, status


def _worker(engine: str, out: Path) -> None:
    """One rank: every method under ``engine``; rank 0 saves checkpoints, each rank its measurements."""
    from datetime import timedelta

    import torch.distributed as dist
    from test_training_integration import ATTACH_OPTIONS, converted
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    import condify
    from condify.integrations import attach, fsdp_wrap_policy, fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank = dist.get_rank()
    results = {}
    for method in sorted(condify.list_methods()):
        model = converted(method)
        fresh = copy.deepcopy(model) if rank == 0 else None
        attach(model, ATTACH_OPTIONS.get(method))
        if engine == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        elif engine == "fsdp1":
            from torch.distributed.fsdp import FullyShardedDataParallel

            wrapped = FullyShardedDataParallel(
                model, use_orig_params=True, device_id=torch.device("cpu"),
                auto_wrap_policy=fsdp_wrap_policy(model),
            )  # fmt: skip
        else:
            wrapped = fully_shard(model)
        rows = _batch()[rank * 2 : rank * 2 + 2]
        losses, status = _train(wrapped, rows)
        wrapped.eval()
        with torch.no_grad():
            logits = wrapped(input_ids=_common(), use_cache=False).logits
            common = wrapped(input_ids=_common(), labels=_common(), use_cache=False).loss.item()
        buffers = {n: b for n, b in model.named_buffers()}
        res = {"losses": losses, "status": status, "common": common, "buffers": _digest(buffers)}
        if engine == "ddp":
            res["params"] = _digest(dict(model.named_parameters()))
            full = None
        else:  # a collective: every rank takes part, rank 0 gets the full tensors
            full = get_model_state_dict(
                wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=False)
            )
        if rank == 0:
            if full is not None:
                fresh.load_state_dict(full)
            condify.save_pretrained(model if engine == "ddp" else fresh, out / method)
            torch.save(logits, out / f"{method}.logits.pt")
        results[method] = res
        dist.barrier()
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


_LAUNCHED: dict[str, tuple[str, Path, list[dict]]] = {}


def _launch(engine: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, list[dict]]:
    """Run this file as the worker on 2 processes under ``engine`` (once per session); returns (engine,
    folder, per-rank results)."""
    if engine in _LAUNCHED:
        return _LAUNCHED[engine]
    out = tmp_path_factory.mktemp(engine)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(SRC), str(HERE), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc-per-node", "2", str(Path(__file__)), engine, str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{engine} workers failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    _LAUNCHED[engine] = engine, out, ranks
    return _LAUNCHED[engine]


@pytest.fixture(params=ENGINES)
def launched(request, tmp_path_factory):
    return _launch(request.param, tmp_path_factory)


def _methods() -> list[str]:
    import condify

    return sorted(condify.list_methods())


@pytest.mark.slow
@pytest.mark.parametrize("method", _methods())
def test_distributed_training_same_model_on_both_ranks(launched, method):
    engine, _, ranks = launched
    a, b = ranks[0][method], ranks[1][method]
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in (a, b))
    assert a["losses"] != b["losses"]  # each rank trained on its own half of the batch
    assert a["common"] == b["common"], (engine, a["common"], b["common"])  # one model on both ranks
    assert a["buffers"] == b["buffers"]
    assert a["status"] == b["status"]  # the per-step controllers measured over both ranks
    if engine == "ddp":
        assert a["params"] == b["params"]


@pytest.mark.slow
@pytest.mark.parametrize("method", _methods())
def test_distributed_checkpoint_from_rank0_loads_exactly(launched, method):
    from test_training_integration import TARGETS, converted, measured

    import condify

    engine, out, _ = launched
    trained = torch.load(out / f"{method}.logits.pt")
    loaded = condify.from_pretrained(out / method).eval()
    assert [c.method for c in condify.applied_configs(loaded)] == [method]
    if method in TARGETS:  # the maintenance ran under this engine: what it holds walked to the target
        before, after = (measured(method, m, _batch()) for m in (converted(method), loaded))
        assert abs(after - TARGETS[method]) < 0.7 * abs(before - TARGETS[method]), (engine, before, after)
    with torch.no_grad():
        logits = loaded(input_ids=_common(), use_cache=False).logits
        if engine == "fsdp2":  # trained with contiguous weights (condify.integrations.fully_shard): same
            torch.testing.assert_close(logits, trained, rtol=0, atol=1e-6)  # values, other summation order
            for p in loaded.parameters():
                p.data = p.data.contiguous()
            logits = loaded(input_ids=_common(), use_cache=False).logits
    assert torch.equal(logits, trained), engine


@pytest.mark.slow
@pytest.mark.parametrize("method", _methods())
def test_ddp_equals_one_process_on_the_whole_batch(tmp_path_factory, method):
    from test_training_integration import converted

    from condify import registry
    from condify.integrations import attach

    _, _, ranks = _launch("ddp", tmp_path_factory)
    if registry.get(method).training is not None:
        pytest.skip(f"{method} averages its per-step controller over the ranks (not the whole batch's)")
    model = converted(method)
    attach(model)
    _train(model, _batch())
    model.eval()
    with torch.no_grad():
        common = model(input_ids=_common(), labels=_common(), use_cache=False).loss.item()
    assert common == pytest.approx(ranks[0][method]["common"], rel=1e-4)


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]))
