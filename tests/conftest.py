"""Tiny datasets written in the exact real formats (IDX gzip, CIFAR python pickles, PNG folders)."""
from __future__ import annotations

import contextlib
import gc
import gzip
import io
import itertools
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX: 0x00 0x00, type 0x08 (ubyte), ndim, big-endian int32 sizes, then the bytes; gzip-compressed."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _class_images(rng: np.random.Generator, labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Images whose mean brightness encodes the class, so a tiny model can learn something."""
    base = (labels.astype(np.float64) * 25 + 10).reshape(-1, *([1] * len(shape)))
    return np.clip(base + rng.normal(0, 20, (len(labels), *shape)), 0, 255).astype(np.uint8)


if os.environ.get("PYTEST_XDIST_WORKER"):  # one of several test processes sharing the cores: one thread each, as
    os.environ["OMP_NUM_THREADS"] = "1"  # the commands it runs (in process or not) then also take, since two
    import torch  # multi-threaded PyTorch processes on the same cores spin against each other

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory) -> Path:
    """One folder for the whole session, shared by its xdist workers (the parent of their own temporary folders),
    for what each worker would otherwise build alike: the tiny teachers and the synthetic sets."""
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared"
    path.mkdir(exist_ok=True)
    return path


@contextlib.contextmanager
def built_once(path: Path):
    """Hold `path`'s lock across the session's workers; yields whether it still has to be built, so that the first
    worker builds it and the others wait, then read it."""
    from zsq.io import exclusive

    with exclusive(path):
        yield not path.exists()


@pytest.fixture(scope="session", autouse=True)
def synth_cache(shared_dir) -> Path:
    """Offline synthetic sets built by tests go to the session's cache, never the user's ~/.cache/zsq. Sets are
    written by an atomic rename and keyed by recipe and teacher hash, so workers building one at once only waste
    time."""
    path = shared_dir / "zsq-cache"
    path.mkdir(exist_ok=True)
    os.environ["ZSQ_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 96), ("t10k", 40)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", _class_images(rng, labels, (28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def write_cifar(root: Path, n_classes: int, n_per_batch: int = 20) -> Path:
    """The python-version CIFAR layout: pickled dicts with b'data' (N×3072 uint8, R then G then B planes)."""
    rng = np.random.default_rng(n_classes)
    if n_classes == 10:
        folder, files, key = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels"
        meta = ("batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    else:
        folder, files, key = root / "cifar-100-python", ["train", "test"], b"fine_labels"
        meta = ("meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)]})
    folder.mkdir(parents=True)
    for name in files:
        labels = rng.integers(0, n_classes, n_per_batch)
        data = _class_images(rng, labels % 10, (3072,))
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, key: labels.tolist(), b"batch_label": name.encode()}, f)
    with open(folder / meta[0], "wb") as f:
        pickle.dump(meta[1], f)
    return folder


@pytest.fixture
def cifar10_dir(tmp_path) -> Path:
    write_cifar(tmp_path, 10)
    return tmp_path


@pytest.fixture
def imagefolder_dir(tmp_path) -> Path:
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for name in ("cat", "dog", "fox"):
            d = tmp_path / split / name
            d.mkdir(parents=True)
            for i in range(2):
                arr = rng.integers(0, 255, (20 + 10 * i, 30, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.{'png' if i == 0 else 'jpg'}")
    return tmp_path


def randomise_bn(model, seed: int = 1, spread: float = 0.1):
    """Trained-looking BN statistics (γ ∈ [0.5, 1.5), β and running means ~ N(0, spread²), variances ∈ [0.5, 1.5)),
    so that a wrong mapping or placement cannot hide behind identity BNs. Returns the model in eval mode."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=g) + 0.5
            m.bias.data = torch.randn(c, generator=g) * spread
            m.running_mean = torch.randn(c, generator=g) * spread
            m.running_var = torch.rand(c, generator=g) + 0.5
    return model.eval()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`zsq ARGS` run by the CLI's own `main` in this process, with its exit code, stdout and stderr as a
    subprocess would give them (a crash: exit 1 and the traceback on stderr). A subprocess would spend seconds
    importing torch for each call; `run_cli_process` is for what needs one (the entry point, kills). What a
    command may change process-wide (threads, deterministic algorithms, warning filters) is put back."""
    import torch
    from zsq.cli import main

    out, err = io.StringIO(), io.StringIO()
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    with contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        stack.enter_context(warnings.catch_warnings())
        try:
            code = main(list(args))
        except SystemExit as e:  # --help, --version
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except Exception:  # noqa: BLE001 - as the interpreter reports an uncaught one
            traceback.print_exc()
            code = 1
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(strict)
    return subprocess.CompletedProcess(["zsq", *args], code, out.getvalue(), err.getvalue())


def run_cli_process(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m zsq ARGS` in a process of its own, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "zsq", *args], capture_output=True, text=True, timeout=timeout)


def kill_when(args: list[str], marker: Path, timeout: float = 300) -> None:
    """Run `zsq ARGS` and SIGKILL its process group as soon as `marker` (its first checkpoint) exists, or when it
    ends by itself: a kill with no chance to clean up, as a power cut or an OOM killer gives."""
    proc = subprocess.Popen([sys.executable, "-m", "zsq", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + timeout
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


TINY_PROBE = ["--probe-images", "8", "--probe-iters", "2"]  # the health check's probe set, kept tiny in tests
PROBE_KW = {"probe_images": 8, "probe_iters": 2}
# GDFQ's and AdaDFQ's generator at a quarter of the papers' 128 channels: 1/16 of its FLOPs, a third less time for a
# tiny run on the default source (7.1 → 4.9 s at 1 thread); no test's check depends on the generator's width
SMALL_GEN = ["--gen-width", "32"]
SMALL_GEN_KW = {"gen_width": 32}
TINY = ["--epochs", "2", "--iters-per-epoch", "3", "--warmup-epochs", "1", "--batch-size", "8", *TINY_PROBE, *SMALL_GEN]


def quantize_tiny(teacher: Path, data_dir: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """`zsq quantize` at the TINY budget (1 warm-up + 3 trained iterations, 50 test images), quietly."""
    return run_cli("quantize", "--teacher", str(teacher), "--data-dir", str(data_dir), *TINY, "--eval-limit", "50",
                   "--out", str(out), "--quiet", *extra)


def shipped_pairs() -> list[tuple[str, str]]:
    """Every data source × transfer loss that zsq ships. A test module may register a source of its own (test_dist's
    fixed images, registered when collection imports it): it would join the product of the modules collected
    after it."""
    from zsq.distill import list_losses
    from zsq.synth import SOURCES, list_sources

    sources = [s for s in list_sources() if SOURCES.get(s).__module__.startswith("zsq.")]
    return list(itertools.product(sources, list_losses()))


def train_steps(job, warmup: int, trained: int, skippable: tuple[str, ...] = ()) -> None:
    """Drive a built job as the training loop does: `warmup` iterations in epoch 0 (the ranges observe), the ranges
    set at its end, then `trained` iterations in epoch 1, none of whose steps may be skipped as NaN/Inf but those of
    the optimisers named in `skippable`."""
    job.start_epoch(0)
    for _ in range(warmup):
        job.iterate(True)
    job.set_ranges()
    job.start_epoch(1)
    for _ in range(trained):
        _, skipped = job.iterate(False)
        assert not any(v for k, v in skipped.items() if k not in skippable), skipped


def shared_teacher(shared_dir: Path, name: str, data_dir: Path, model: str, epochs: int) -> Path:
    """`zsq teacher train` on the fake Fashion-MNIST, once per session: the first worker trains it, the others read
    it (each would have trained the same bytes)."""
    out = shared_dir / f"{name}.pt"
    with built_once(out) as build:
        if build:
            proc = run_cli("teacher", "train", "--model", model, "--data-dir", str(data_dir), "--epochs", str(epochs),
                           "--batch-size", "32", "--lr", "0.05", "--out", str(out))
            assert proc.returncode == 0, proc.stderr
            assert "saved" in proc.stdout and out.is_file()
            assert not out.with_name(out.name + ".resume").exists()
    return out


@pytest.fixture(scope="session")
def tiny_teacher(fmnist_dir, shared_dir) -> Path:
    """A ResNet-20 after 2 epochs: near-uniform outputs, enough for every command to run on."""
    return shared_teacher(shared_dir, "tiny-teacher", fmnist_dir, "resnet20", 2)


def pytest_collection_finish(session) -> None:
    """What is imported by now lives as long as the session: frozen out of the collector's sight, each full
    collection (a dozen per worker, and five when pytest ends) walks what the tests made, not the ~330,000 objects
    of torch and its compiler's modules (0.4 s each)."""
    import torch._dynamo  # noqa: F401 - the first optimizer imports it anyway (torch._compile)

    gc.freeze()
