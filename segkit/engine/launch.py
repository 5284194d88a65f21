"""``launch()``: run a function in one process, in N local processes, or as one rank of a job.

Four ways a segkit run is placed, all through :func:`launch` (DESIGN.md, "Training, launching,
scale"); the first that applies is taken:

1. **torchrun** (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` are set): this
   process joins that job (``env://`` rendezvous); nothing is spawned.
2. **submitit / SLURM** (inside a submitit job with more than one task, e.g. the
   ``hydra/launcher=slurm`` preset, one task per GPU): rank, world size and local rank come from
   the job environment, the master address is the job's first host and the port is derived
   from the job id, so every task computes the same rendezvous without talking.
3. **Local processes** (``num_processes_per_machine * num_machines > 1``): N processes are
   spawned on this machine (``spawn`` start method: fork would copy a process that may already
   hold OpenMP or CUDA state). ``dist_url="auto"`` picks a free port on 127.0.0.1 (one machine
   only); several machines need an explicit ``tcp://host:port`` and ``machine_rank``.
4. Otherwise ``main_func`` simply runs in this process.

The backend is gloo on CPU and NCCL on CUDA (``backend="auto"``). Each CUDA process uses the
GPU of its local rank. CPU processes share the machine's cores: each gets
``cores // local processes`` threads, so N processes do not oversubscribe the cores.
"""
from __future__ import annotations

import datetime
import logging
import os
import pickle
import socket
import tempfile
import time
import traceback
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["DistributedEnvironment", "ProcessFailedError", "detect_environment", "launch",
           "master_port_for_job"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)


class DistributedEnvironment:
    """Where this process sits in a job: rank, local rank, world size and rendezvous."""

    def __init__(self, rank: int, local_rank: int, world_size: int, master_addr: str,
                 master_port: int, source: str):
        self.rank, self.local_rank, self.world_size = rank, local_rank, world_size
        self.master_addr, self.master_port, self.source = master_addr, master_port, source

    def export(self) -> None:
        """Set the variables ``env://`` rendezvous and :func:`segkit.utils.comm` read."""
        os.environ.update(RANK=str(self.rank), LOCAL_RANK=str(self.local_rank),
                          WORLD_SIZE=str(self.world_size), MASTER_ADDR=self.master_addr,
                          MASTER_PORT=str(self.master_port))

    def __repr__(self) -> str:
        return (f"{self.source}: rank {self.rank}/{self.world_size} (local {self.local_rank}), "
                f"master {self.master_addr}:{self.master_port}")


def master_port_for_job(job_id: str) -> int:
    """A port in 20000..39999 from a scheduler job id: the same on every task of the job, and
    two jobs sharing a node rarely collide."""
    digits = "".join(c for c in str(job_id) if c.isdigit()) or "0"
    return 20000 + int(digits[-8:]) % 20000


def _from_torchrun() -> Optional[DistributedEnvironment]:
    env = os.environ
    if not all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return None
    return DistributedEnvironment(
        int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]),
        env["MASTER_ADDR"], int(env["MASTER_PORT"]), "torchrun")


def _from_submitit() -> Optional[DistributedEnvironment]:
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return None
    import submitit

    job = submitit.JobEnvironment()
    if job.num_tasks <= 1:
        return None
    executor = os.environ["SUBMITIT_EXECUTOR"]
    # SLURM: the job's first node (submitit parses SLURM_JOB_NODELIST in SLURM's order);
    # submitit's local executor runs every task on this machine
    master = "127.0.0.1" if executor == "local" else job.hostnames[0]
    return DistributedEnvironment(job.global_rank, job.local_rank, job.num_tasks, master,
                                  master_port_for_job(job.job_id), f"submitit-{executor}")


def detect_environment() -> Optional[DistributedEnvironment]:
    """The job this process already belongs to (torchrun or a multi-task submitit job), or
    None when it was started alone."""
    return _from_torchrun() or _from_submitit()


def _backend(backend: str, device: str) -> str:
    if backend != "auto":
        return backend
    return "nccl" if str(device).startswith("cuda") else "gloo"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_process_group(backend: str, init_method: str, rank: int, world_size: int,
                        local_rank: int, timeout: datetime.timedelta) -> None:
    if backend == "nccl":
        if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"launch: the NCCL backend needs a GPU per process, but local rank {local_rank} "
                f"sees {torch.cuda.device_count()} CUDA device(s); use train.device=cpu "
                "(gloo) or fewer processes per machine")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timeout)
    logger.info("process group ready: rank %d of %d (%s, %s)", rank, world_size, backend,
                init_method)


def _run_in_group(main_func: Callable[..., Any], args: Sequence[Any],
                  error_file: Optional[str] = None) -> Any:
    """``main_func(*args)`` in an initialised group, which is torn down afterwards.

    Args:
        error_file: where a failure's time and traceback go, written before the group is torn
            down: the other processes fail only once this one leaves, so the launcher's report
            can put the cause first.
    """
    from segkit.utils.comm import synchronize

    try:
        result = main_func(*args)
        # leave together: a process tearing down its group while another still talks to it
        # can abort the other (gloo)
        synchronize()
        return result
    except BaseException:
        if error_file is not None:
            with open(error_file, "w") as f:
                f.write(f"{time.time()!r}\n{traceback.format_exc()}")
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _worker(local_rank: int, main_func: Callable[..., Any], args: Sequence[Any],
            world_size: int, num_local: int, machine_rank: int, backend: str, dist_url: str,
            timeout: datetime.timedelta, result_file: str) -> None:
    """Entry point of a spawned process (module level: ``spawn`` pickles it by name)."""
    rank = machine_rank * num_local + local_rank
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(num_local))
    if backend == "gloo":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // num_local))
    _init_process_group(backend, dist_url, rank, world_size, local_rank, timeout)
    result = _run_in_group(main_func, args, error_file=os.path.join(
        os.path.dirname(result_file), f"error-rank{rank}.txt"))
    if rank == 0:
        with open(result_file, "wb") as f:
            pickle.dump(result, f)


class ProcessFailedError(RuntimeError):
    """One or more spawned processes raised; the message holds their tracebacks."""


def _failure_report(folder: str, world_size: int) -> str:
    failures = []
    for name in os.listdir(folder):
        if name.startswith("error-rank"):
            with open(os.path.join(folder, name)) as f:
                when, _, text = f.read().partition("\n")
            failures.append((float(when), name[len("error-rank"):-len(".txt")], text.rstrip()))
    parts = [f"--- rank {rank}: {text.splitlines()[-1]}\n{text}"
             for _, rank, text in sorted(failures)]
    return (f"launch: {len(failures)} of {world_size} processes failed (in the order they "
            "failed; the first is usually the cause):\n" + "\n".join(parts))


def launch(main_func: Callable[..., Any], args: Sequence[Any] = (), *,
           num_processes_per_machine: int = 1, num_machines: int = 1, machine_rank: int = 0,
           dist_url: str = "auto", backend: str = "auto", device: str = "cpu",
           timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> Any:
    """Run ``main_func(*args)`` in every process of the job (module docstring for the modes).

    Args:
        main_func: a module-level function (spawned processes import it by name).
        args: its arguments; they must pickle when processes are spawned (a ``DictConfig``
            does).
        num_processes_per_machine: processes to spawn on this machine (one per GPU on CUDA).
        num_machines: machines of a multi-machine job started by hand (each runs ``launch``
            with its ``machine_rank`` and the same ``dist_url``).
        machine_rank: this machine's index, 0 on the machine that hosts ``dist_url``.
        dist_url: ``tcp://host:port`` rendezvous, or ``auto`` for a free local port.
        backend: ``gloo``, ``nccl`` or ``auto`` (from ``device``).
        device: ``cpu`` or ``cuda``, which picks the backend and the thread split.
        timeout: of the collectives (a process waiting longer for the others fails).

    Returns:
        What ``main_func`` returned on this process; with spawned processes, what it returned
        on rank 0 (it must pickle), or None on a machine other than 0.

    Raises:
        ValueError: bad process counts, or several machines with ``dist_url="auto"``.
        ProcessFailedError: a spawned process raised; the others are stopped and the message
            holds the traceback of every failed process, the first failure first.
    """
    env = detect_environment()
    chosen = _backend(backend, device)
    if env is not None:
        if dist.is_initialized():  # already in a group (e.g. a test harness): just run
            return main_func(*args)
        env.export()
        logger.info("joining %s", env)
        _init_process_group(chosen, "env://", env.rank, env.world_size, env.local_rank, timeout)
        return _run_in_group(main_func, args)

    if num_processes_per_machine < 1 or num_machines < 1:
        raise ValueError(f"launch: num_processes_per_machine ({num_processes_per_machine}) and "
                         f"num_machines ({num_machines}) must be >= 1")
    if not 0 <= machine_rank < num_machines:
        raise ValueError(f"launch: machine_rank must be in [0, {num_machines}), got "
                         f"{machine_rank}")
    world_size = num_processes_per_machine * num_machines
    if world_size == 1:
        return main_func(*args)
    if dist_url == "auto":
        if num_machines > 1:
            raise ValueError("launch: dist_url=auto works on one machine only; give every "
                             "machine the same tcp://<address of machine 0>:<port>")
        dist_url = f"tcp://127.0.0.1:{_free_port()}"

    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    logger.info("launching %d processes on this machine (world size %d, %s, %s)",
                num_processes_per_machine, world_size, chosen, dist_url)
    with tempfile.TemporaryDirectory(prefix="segkit-launch-") as tmp:
        result_file = os.path.join(tmp, "result.pkl")
        try:
            mp.start_processes(
                _worker, nprocs=num_processes_per_machine, start_method="spawn",
                args=(main_func, tuple(args), world_size, num_processes_per_machine,
                      machine_rank, chosen, dist_url, timeout, result_file))
        except ProcessException as e:
            if not any(n.startswith("error-rank") for n in os.listdir(tmp)):
                raise  # killed by a signal: torch's message says which
            raise ProcessFailedError(_failure_report(tmp, world_size)) from e
        if not os.path.exists(result_file):
            return None
        with open(result_file, "rb") as f:
            return pickle.load(f)
