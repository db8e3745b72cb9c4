"""Data-parallel runs (torchrun / DDP) on the CPU with gloo, two processes, tiny budgets."""
from __future__ import annotations

import faulthandler
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import zsq
import zsq.train
from zsq.synth import SOURCES
from zsq.synth.base import DataSource, SourceContext

from conftest import PROBE_KW, SMALL_GEN, SMALL_GEN_KW, TINY_PROBE, run_cli

TINY_KW = {"epochs": 2, "iters_per_epoch": 3, "warmup_epochs": 1, "batch_size": 8, "eval_limit": 50, **PROBE_KW,
           **SMALL_GEN_KW}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SYNTH = ["synth", "--images", "12", "--batch-size", "4", "--iters", "3", "--quiet"]


class FixedImages(DataSource):
    """A stored batch of 2·B images: rank r of a 2-process run gets the r-th half, a 1-process run the whole of
    it, so both runs train on the same images."""

    online = False

    def __init__(self, ctx: SourceContext, opts: object) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(123)
        self.images = torch.randn(16, ctx.in_channels, ctx.image_size, ctx.image_size, generator=g)
        self.labels = torch.randint(0, ctx.num_classes, (16,), generator=g)

    def sample(self, batch_size: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        r = dist.get_rank() if dist.is_initialized() else 0
        return self.images[r * batch_size:(r + 1) * batch_size], self.labels[r * batch_size:(r + 1) * batch_size]


if "fixed-test-images" not in SOURCES.names():
    SOURCES.register("fixed-test-images")(FixedImages)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, folder: str, runs: list[dict]) -> None:
    """One rank, launched the way torchrun does (its variables), running one command after the other in the same
    process: per entry of `runs` the Python API (recording the run's model and every file it wrote through
    save_json) or, given `cli`, the command line in process (recording what it printed). A rank that hangs fails
    the test with every thread's stack instead of stalling the suite."""
    faulthandler.dump_traceback_later(300, exit=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    records = []
    save_json = zsq.train.folder.save_json
    for kwargs in runs:
        if "cli" in kwargs:
            proc = run_cli(*kwargs["cli"])
            records.append({"code": proc.returncode, "stdout": proc.stdout, "stderr": proc.stderr})
            continue
        written: list[str] = []
        zsq.train.folder.save_json = lambda obj, path: (written.append(Path(path).name), save_json(obj, path))[1]
        result = zsq.quantize(quiet=True, **kwargs)
        records.append({"state": result.qmodel.state_dict(), "written": written, "q_top1": result.q_top1,
                        "rank": result.rank})
    torch.save(records, Path(folder) / f"rank{rank}.pt")


def _spawn(tmp_path: Path, runs: list[dict]) -> list[list[dict]]:
    """Each rank's records, run by run."""
    mp.spawn(_rank, args=(2, _free_port(), str(tmp_path), runs), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_two_ranks_run_quantize_twice_and_synth_in_one_process(tiny_teacher, fmnist_dir, tmp_path):
    """Three commands in the same two processes, as a torchrun script calling zsq twice and `zsq synth` do (the
    second run joined the process group again and hung in 6 of 9 attempts before the group stayed open). The
    first run ends alike on both ranks and only rank 0 writes. In the second, 2 ranks × B images = 1 process × 2B
    images, same images: the same Q model after its first step (the BN prior makes the ranges independent of the
    warm-up images, which differ between the two). `zsq synth` splits its batches over the ranks into the set one
    process makes, and says so once."""
    out = tmp_path / "run"
    common = dict(teacher=str(tiny_teacher), data_dir=str(fmnist_dir), source="fixed-test-images", loss="kd+ce",
                  wbits=4, abits=4, act_range="bn-prior", epochs=2, iters_per_epoch=1, warmup_epochs=1,
                  eval_limit=8, lr_q=0.05, **PROBE_KW)
    ranks = _spawn(tmp_path, [dict(teacher=str(tiny_teacher), data_dir=str(fmnist_dir), out=str(out), wbits=4,
                                   abits=4, **TINY_KW),
                              dict(out=str(tmp_path / "two"), batch_size=8, **common),
                              dict(cli=[*SYNTH, "--teacher", str(tiny_teacher), "--out", str(tmp_path / "two.pt")])])
    first = [r[0] for r in ranks]
    a, b = first[0]["state"], first[1]["state"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # weights, BN affine and every activation range alike
    his = [v for k, v in a.items() if k.endswith(".hi")]
    assert his and all(h > 0 for h in his)
    assert first[0]["written"] == ["config.json", "result.json"] and first[1]["written"] == []
    assert [r["rank"] for r in first] == [0, 1] and first[0]["q_top1"] == first[1]["q_top1"]
    config = json.loads((out / "config.json").read_text())
    assert config["distributed"] == {"world_size": 2, "backend": "gloo", "batch_per_rank": 8, "global_batch": 16}
    assert json.loads((out / "result.json").read_text())["world_size"] == 2
    assert not (out / "state.pt").exists()

    two = ranks[0][1]["state"]
    torch.set_num_threads(1)
    one = zsq.quantize(out=str(tmp_path / "one"), batch_size=16, quiet=True, **common).qmodel.state_dict()
    start = zsq.load_model(str(tiny_teacher)).state_dict()
    moved = 0
    for k, v in one.items():
        if k.endswith((".ema_min", ".ema_max")):  # the warm-up's own statistics, not used by the BN prior
            continue
        torch.testing.assert_close(two[k], v, rtol=1e-4, atol=1e-6, msg=k)
        moved += k in start and not torch.allclose(start[k], v, atol=1e-6)
    assert moved > 10  # the step did change the weights

    said = [r[2] for r in ranks]
    assert [r["code"] for r in said] == [0, 0], said[0]["stderr"][-2000:] + said[1]["stderr"][-2000:]
    assert said[0]["stdout"].count("images") == 1 and "images" not in said[1]["stdout"]  # rank 0 says it
    one = run_cli(*SYNTH, "--teacher", str(tiny_teacher), "--out", str(tmp_path / "one.pt"))
    assert one.returncode == 0, one.stderr
    a, b = (torch.load(tmp_path / f"{n}.pt", weights_only=False) for n in ("one", "two"))
    assert a["images"].shape == (12, 1, 32, 32)
    torch.testing.assert_close(b["images"], a["images"])  # batch 1 came from rank 1, the same pixels
    assert torch.equal(b["labels"], a["labels"]) and torch.allclose(b["final_loss"], a["final_loss"])


def test_torchrun_sigterm_stops_every_rank_at_one_step_and_resumes(tiny_teacher, fmnist_dir, tmp_path):
    """torchrun forwards the signal to each rank at its own moment: they agree on one iteration, the main rank
    checkpoints it, and `--resume` on two processes finishes with every iteration logged once, by one rank, and
    the result printed once. A run started on two processes is not resumed on one."""
    out = tmp_path / "run"
    args = ["quantize", "--teacher", str(tiny_teacher), "--data-dir", str(fmnist_dir), "--epochs", "2",
            "--iters-per-epoch", "12", "--warmup-epochs", "1", "--batch-size", "4", "--ckpt-every", "100000",
            "--quiet", "--eval-limit", "8", "--out", str(out), *TINY_PROBE, *SMALL_GEN]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "zsq"]
    proc = subprocess.Popen([*launch, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 300
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= 4) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and err.count("continue with --resume") == 2
    steps = {int(m) for m in re.findall(r"at iteration (\d+)", err)}
    state = torch.load(out / "state.pt", weights_only=False)
    assert steps == {state["step"]} and 0 < state["step"] < 24 and len(state["rng_ranks"]) == 1
    resumed = subprocess.run([*launch, *args, "--resume"], capture_output=True, text=True, env=ENV, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stdout.count("q_top1") == 1
    assert json.loads((out / "result.json").read_text())["world_size"] == 2
    rows = [json.loads(l)["iter"] for l in metrics.read_text().splitlines()]
    assert rows == list(range(24)) and not (out / "state.pt").exists()
    (out / "result.json").unlink()
    (out / "state.pt").write_bytes(b"")
    single = run_cli(*args, "--resume")
    assert single.returncode == 2 and "2 process(es)" in single.stderr
