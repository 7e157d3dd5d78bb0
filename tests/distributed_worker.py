"""The distributed side of ``tests/test_distributed.py``, run by torchrun in 2 gloo processes.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py JOBS.json

``JOBS.json`` is a list of jobs run one after another in one process group (one launch,
so the suite pays torchrun's start-up once):

* ``{"argv": [...]}``: ``osd train`` with these arguments (``osd.train.main``);
* ``{"copy": [src, dst]}``: rank 0 copies a run directory (to resume it elsewhere);
* ``{"check_replicas": out_json}``: train two steps, then make rank 1's ``P`` differ by one
  element and record whether :func:`osd.distributed.check_replicas` notices;
* ``{"expect_error": argv, "out": out_json}``: record the error ``osd train`` reports;
* ``{"hf_spread": out_json}``: step an optimizer of the Hugging Face route (GaLore, ``T = 2``)
  four times in a plain loop and record the steps whose SVD refresh was spread over the ranks.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

from osd import distributed
from osd.hf import create_trainer_optimizer
from osd.models import build_model, llama_config
from osd.presets import create_optimizer
from osd.state_layout import PROJ, is_projected
from osd.train import main


def check_replicas_job(out: str) -> None:
    parallel = distributed.current(torch.device("cpu"))
    torch.manual_seed(0)
    model = distributed.wrap(build_model(llama_config("nano", 64, 16)), parallel)
    optimizer = create_optimizer(distributed.unwrap(model), "galore_adamw", lr=1e-3, rank=4)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(parallel.rank))
    for _ in range(2):
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    distributed.check_replicas(model, optimizer, parallel)  # equal so far: must not raise
    if parallel.rank == 1:
        next(state[PROJ] for state in optimizer.state.values() if is_projected(state))[0, 0] += 1e-6
    try:
        distributed.check_replicas(model, optimizer, parallel)
        message = None
    except RuntimeError as error:
        message = str(error)
    if parallel.is_main:
        with open(out, "w") as f:
            json.dump({"error": message}, f)


def hf_spread_job(out: str) -> None:
    parallel = distributed.current(torch.device("cpu"))
    torch.manual_seed(0)
    model = distributed.wrap(build_model(llama_config("nano", 64, 16)), parallel)
    args = SimpleNamespace(learning_rate=1e-3, weight_decay=0.0, seed=0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
                           optim_args="rank=4, update_proj_gap=2", optim_target_modules=None)
    optimizer = create_trainer_optimizer(distributed.unwrap(model), args, "galore_adamw")
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(parallel.rank))
    for _ in range(4):
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    if parallel.is_main:
        with open(out, "w") as f:
            json.dump({"basis_steps": sorted({state.get("basis_step", -1) for state in optimizer.state.values() if "proj" in state})}, f)


def expect_error_job(argv: list[str], out: str) -> None:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = main(argv)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"status": status, "stderr": stderr.getvalue()}, f)


def run_jobs(jobs: list[dict]) -> None:
    for job in jobs:
        if "argv" in job:
            if main(job["argv"]) != 0:
                raise SystemExit(f"osd train {job['argv']} failed")
        elif "copy" in job:
            if dist.get_rank() == 0:
                shutil.copytree(*job["copy"])
        elif "check_replicas" in job:
            check_replicas_job(job["check_replicas"])
        elif "hf_spread" in job:
            hf_spread_job(job["hf_spread"])
        elif "expect_error" in job:
            expect_error_job(job["expect_error"], job["out"])
        else:
            raise SystemExit(f"unknown job {job}")
        dist.barrier()


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    with distributed.launched("cpu"):
        run_jobs(jobs)
