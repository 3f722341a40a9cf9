"""Ray mode: :class:`BatchWorker` actors (models loaded once, avatar cache kept), the driver's scheduler (group
affinity, replacement of dead actors, retries, ``--collect``). ``ray`` is imported only when a Ray batch runs."""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping

from musetalk.frontends.batch.jobs import BatchJob, order_by_group
from musetalk.frontends.batch.outputs import JobResult, JobStarted, _cancel, _Outputs
from musetalk.frontends.batch.runner import JobRunner
from musetalk.frontends.signals import reclaim as reclaim_stop_signals
from musetalk.config import GenerationConfig
from musetalk.errors import InputError, MuseTalkError

log = logging.getLogger("musetalk.frontends.batch")  # one logger name for the whole package, as before the split

START_TIMEOUT_S = 600.0  # Ray: how long to wait for the first worker (model loading on a cold node included)


# -- 4b. Ray mode -----------------------------------------------------------------------------------------------
class BatchWorker:
    """A Ray actor: loads the models once, keeps its avatar cache, runs one job at a time.

    Load errors are kept and reported by :meth:`ready` (a constructor that raises would only surface as an
    opaque "actor died" on the first call).
    """

    def __init__(self, models: str | None, config: GenerationConfig) -> None:
        import socket

        from musetalk.stream.leftovers import held_temp_dir
        from musetalk.stream.pipeline import MuseTalkPipeline

        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.error: str | None = None
        self.runner: JobRunner | None = None
        self.tmp, self._hold = held_temp_dir("musetalk-batch-worker-")  # after sweeping what killed workers left
        self._inputs: dict[str, Path] = {}
        try:
            pipe = MuseTalkPipeline.from_pretrained(models, version=config.version, device=config.runtime.device,
                                                    dtype=config.runtime.dtype, backend=config.runtime.backend,
                                                    keep_landmarkers=True)  # a worker prepares row after row
            self.runner = JobRunner(pipe, self.name)
        except MuseTalkError as exc:
            self.error = exc.message + (f" (fix: {exc.fix})" if exc.fix else "")
        except Exception as exc:  # reported to the driver, which stops the batch with it
            self.error = f"{type(exc).__name__}: {exc}"

    def ready(self, probe: str | None = None, token: str | None = None) -> dict[str, Any]:
        """Name, device and load error of this worker; whether it sees the driver's ``probe`` file holding ``token``."""
        sees = None
        if probe is not None:
            try:
                sees = Path(probe).read_text() == token
            except OSError:
                sees = False
        device = str(self.runner.pipe.device) if self.runner is not None else None
        return {"name": self.name, "device": device, "error": self.error, "sees_output": sees}

    def _materialize(self, blob: Mapping[str, Any]) -> Path:
        """Write an input shipped by the driver (``--collect``) into this worker's temp folder, once per content."""
        if blob["hash"] not in self._inputs:
            folder = self.tmp / "inputs" / blob["hash"]
            folder.mkdir(parents=True, exist_ok=True)
            for relative, data in blob["files"].items():
                (folder / relative).write_bytes(data)
            self._inputs[blob["hash"]] = folder / blob["name"] if blob["single"] else folder
        return self._inputs[blob["hash"]]

    def run(self, job: BatchJob, staged: str | None, source: Mapping[str, Any] | None = None,
            audio: Mapping[str, Any] | None = None) -> tuple[JobResult, bytes | None]:
        """Run ``job`` into ``staged`` (shared file system), or into a temp file whose bytes are returned."""
        assert self.runner is not None, "run() on a worker whose models failed to load"
        if source is not None and audio is not None:
            job = replace(job, source=self._materialize(source), audio=self._materialize(audio))
        out = Path(staged) if staged else self.tmp / f"row{job.row}" / Path(job.output).name
        out.parent.mkdir(parents=True, exist_ok=True)
        result = self.runner.run(job, out)
        data = None
        if staged is None and result.state == "done":
            data = out.read_bytes()
            out.unlink()
        return result, data

    def close(self) -> None:
        """Remove this worker's temp folder (called by the driver at the end of a batch)."""
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._hold.release()


def _pack_input(path: Path) -> dict[str, Any]:
    """A source / audio file or frame folder as bytes, for workers that cannot read the driver's files."""
    from musetalk.stream.avatar import hash_source

    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return {"hash": hash_source(path), "name": path.name, "single": path.is_file(),
            "files": {p.name: p.read_bytes() for p in files}}


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MuseTalkError("Ray is not installed", 'pip install "musetalk[ray]" (or run without --ray)') from None
    return ray


def _connect(ray: Any, address: bool | str) -> bool:
    """Start or join a Ray runtime unless this process already has one; True when we must shut it down."""
    if ray.is_initialized():
        return False
    if address in (True, "local"):
        # no dashboard: ~2 s faster start and two processes fewer; start a cluster with `ray start --head` to get one
        ray.init(include_dashboard=False)
    else:
        try:
            ray.init(address=address)
        except (ConnectionError, ValueError) as err:
            raise MuseTalkError(f"cannot join the Ray cluster at {address}: {err}",
                                "start it with `ray start --head` (then use --ray auto), or check the ray:// "
                                "address and port (10001 by default)") from None
    reclaim_stop_signals()  # ray.init replaced our SIGTERM handler with sys.exit(15): no cleanup message, status 15
    return True


def _source_checkout_env() -> dict[str, Any] | None:
    """PYTHONPATH for workers when musetalk runs from a source checkout rather than an installed package."""
    from importlib import metadata

    try:
        metadata.distribution("musetalk")
        return None
    except metadata.PackageNotFoundError:
        return {"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[3])}}


def plan_workers(resources: Mapping[str, float], jobs: int, workers: int | None = None,
                 cpus_per_worker: float | None = None) -> tuple[int, dict[str, float]]:
    """How many actors, and the resources of each: one per GPU when the cluster has GPUs, else one per
    ``cpus_per_worker`` CPUs (default: the CPUs split evenly over ``workers``, or 4 CPUs each). Never more actors
    than jobs."""
    gpus, cpus = int(resources.get("GPU", 0)), float(resources.get("CPU", 0))
    if gpus:
        count = min(workers or gpus, gpus)
        if workers and workers > gpus:
            log.warning("%d workers asked, but the cluster has %d GPUs: using %d", workers, gpus, gpus)
        options = {"num_gpus": 1.0, "num_cpus": float(cpus_per_worker or 1)}
    else:
        per = cpus_per_worker or (max(1.0, cpus // workers) if workers else max(1.0, min(4.0, cpus)))
        fits = max(1, int(cpus // per)) if cpus else (workers or 1)
        count = min(workers or fits, fits)
        if workers and workers > fits:
            log.warning("%d workers of %g CPUs asked, but the cluster has %g CPUs: using %d", workers, per, cpus, fits)
        options = {"num_cpus": float(per)}
    return max(1, min(count, jobs)), options


def pick_group(current: Hashable | None, pending: Mapping[Hashable, int], owned: set[Hashable]) -> Hashable | None:
    """The avatar group an idle actor works on next: the one it prepared last (its avatar is ready); else the
    first group no other actor is on; else the group with the most pending jobs (an idle actor helps rather than
    waits; on one node it even reuses the avatar from the shared cache). None when nothing is pending.

    pending: jobs left per group, in order. owned: the groups other actors are on.
    """
    groups = [g for g, n in pending.items() if n > 0]
    if not groups:
        return None
    if current in groups:
        return current
    free = [g for g in groups if g not in owned]
    return free[0] if free else max(groups, key=lambda g: pending[g])


@dataclass
class _Slot:
    """One actor position of the pool; its actor is replaced when it dies."""

    index: int
    actor: Any = None
    name: str = ""
    state: str = "starting"  # starting | idle | busy
    group: Hashable | None = None  # avatar group this actor prepared last: it gets that group's next jobs
    job: BatchJob | None = None
    ref: Any = None  # ObjectRef of ready() or run()
    started_at: float = field(default_factory=time.monotonic)


class _RayScheduler:
    """Driver side of Ray mode: a pool of actors, group affinity, replacement of dead actors, retries."""

    def __init__(self, ray: Any, jobs: list[BatchJob], outputs: _Outputs, config: GenerationConfig, models: str | None,
                 count: int, options: dict[str, float], retries: int, collect: bool,
                 on_job_start: Callable[[JobStarted], None] | None) -> None:
        self.ray, self.outputs, self.config, self.models = ray, outputs, config, models
        self.options, self.retries, self.collect, self.on_job_start = options, retries, collect, on_job_start
        self.pending: OrderedDict[Hashable, deque[BatchJob]] = OrderedDict()
        for job in order_by_group(jobs):
            self.pending.setdefault(job.group, deque()).append(job)
        self.attempts: dict[int, int] = {}
        self.slots = [_Slot(i) for i in range(count)]
        self.start_failures = 0
        self.first_ready: float | None = None
        self._blobs: dict[Path, Any] = {}
        self._probe = None if collect else outputs.staging / ".probe"
        self._token = uuid.uuid4().hex
        if self._probe is not None:
            self._probe.write_text(self._token)

    # -- actors
    def _start(self, slot: _Slot) -> None:
        cls = self.ray.remote(BatchWorker).options(**self.options, max_restarts=0, max_concurrency=1,
                                                   runtime_env=_source_checkout_env())
        slot.actor = cls.remote(str(self.models) if self.models else None, self.config)
        slot.state, slot.job, slot.started_at = "starting", None, time.monotonic()
        slot.ref = slot.actor.ready.remote(str(self._probe) if self._probe else None, self._token)

    def _on_ready(self, slot: _Slot, info: dict[str, Any]) -> None:
        if info["error"]:
            raise MuseTalkError(f"worker {info['name']} could not load the models: {info['error']}",
                                "every node needs the weights at the --models path (or $MUSETALK_MODELS)")
        if info["sees_output"] is False:
            raise InputError(f"worker {info['name']} cannot see the output folder {self.outputs.dir}",
                             "put the output folder on a file system every node mounts at the same path, "
                             "or pass --collect to stream the videos back to this machine")
        log.info("worker %s ready on %s", info["name"], info["device"])
        slot.name, slot.state = info["name"], "idle"
        if self.first_ready is None:
            self.first_ready = time.perf_counter()

    def _replace(self, slot: _Slot, err: BaseException) -> None:
        """The actor of ``slot`` died: retry its job (or fail it after ``retries``) and start a new actor."""
        job = slot.job
        log.warning("worker %s died (%s)", slot.name or f"#{slot.index}", type(err).__name__)
        if job is None:
            self.start_failures += 1
            if self.start_failures > max(3, len(self.slots) * (self.retries + 1)):
                raise MuseTalkError(f"Ray workers keep dying before they are ready: {err}",
                                    "check the workers' logs (ray logs / the dashboard): memory, GPU, install")
        else:
            self.outputs.discard(job)
            if self.attempts[job.row] <= self.retries:
                self.pending.setdefault(job.group, deque()).appendleft(job)
                self.pending.move_to_end(job.group, last=False)
            else:
                self.outputs.finish(None, JobResult(job.row, None, "failed", error=f"its worker died "
                                                    f"{self.attempts[job.row]} times ({type(err).__name__})",
                                                    attempts=self.attempts[job.row], worker=slot.name))
        try:
            self.ray.kill(slot.actor, no_restart=True)
        except Exception as exc:  # it is dead already; nothing else to do
            log.debug("kill after death: %s", exc)
        self._start(slot)  # keeps the affinity; an actor that is idle earlier may take the retried job first

    # -- jobs
    def _next_job(self, slot: _Slot) -> BatchJob | None:
        owned = {s.group for s in self.slots if s is not slot and s.state != "starting"}
        slot.group = pick_group(slot.group, {g: len(q) for g, q in self.pending.items()}, owned)
        return None if slot.group is None else self.pending[slot.group].popleft()

    def _dispatch(self, slot: _Slot) -> None:
        job = self._next_job(slot)
        if job is None:
            return
        self.attempts[job.row] = self.attempts.get(job.row, 0) + 1
        staged = self.outputs.staged(job)
        if self.on_job_start is not None:
            self.on_job_start(JobStarted(job.row, self.attempts[job.row], slot.name, slot.actor,
                                         None if self.collect else staged))
        blobs = []
        if self.collect:
            for path in (job.source, job.audio):
                if path not in self._blobs:  # each input crosses the network once, then lives in the object store
                    self._blobs[path] = self.ray.put(_pack_input(path))
                blobs.append(self._blobs[path])
        slot.job, slot.state = job, "busy"
        slot.ref = slot.actor.run.remote(job, None if self.collect else str(staged), *blobs)

    def _on_result(self, slot: _Slot, value: tuple[JobResult, bytes | None]) -> None:
        result, data = value
        job = slot.job
        assert job is not None
        result.attempts = self.attempts[job.row]
        self.outputs.finish(job, result, data)
        slot.job, slot.state = None, "idle"

    # -- the main loop
    def run(self, start_timeout: float = START_TIMEOUT_S) -> None:
        """Start the actors, hand out jobs until none is left, stop the actors (also on errors and Ctrl-C)."""
        RayActorError = self.ray.exceptions.RayActorError
        try:
            for slot in self.slots:
                self._start(slot)
            while any(self.pending.values()) or any(s.state == "busy" for s in self.slots):
                # 1. hand a job to every idle actor
                for slot in self.slots:
                    if slot.state == "idle":
                        self._dispatch(slot)
                # 2. wait for one answer (a worker ready, a job done, or a death)
                by_ref = {s.ref: s for s in self.slots if s.state in ("starting", "busy")}
                done, _ = self.ray.wait(list(by_ref), num_returns=1, timeout=1.0)
                for ref in done:
                    slot = by_ref[ref]
                    try:
                        value = self.ray.get(ref)
                    except RayActorError as err:
                        self._replace(slot, err)
                        continue
                    except self.ray.exceptions.RayTaskError as err:  # a bug in the worker code itself
                        self._fail_slot_job(slot, err)
                        continue
                    except self.ray.exceptions.RayError as err:  # object lost, memory monitor, worker crash
                        self._replace(slot, err)
                        continue
                    if slot.state == "starting":
                        self._on_ready(slot, value)
                    else:
                        self._on_result(slot, value)
                # 3. no worker at all after the start timeout: the cluster cannot place them
                waited = time.monotonic() - min(s.started_at for s in self.slots)
                if self.first_ready is None and waited > start_timeout:
                    raise MuseTalkError(f"no Ray worker started within {start_timeout:.0f} s (each needs "
                                        f"{self.options})", "lower --cpus-per-worker, or add nodes to the cluster")
        except BaseException:
            busy = [s.job for s in self.slots if s.job is not None]
            _cancel(self.outputs, busy + [j for q in self.pending.values() for j in q], self.attempts)
            raise
        finally:
            self._stop()

    def _fail_slot_job(self, slot: _Slot, err: BaseException) -> None:
        if slot.job is None:
            raise MuseTalkError(f"a Ray worker failed while starting: {err}", "see the traceback above")
        self.outputs.finish(None, JobResult(slot.job.row, None, "failed", error=str(err),
                                            attempts=self.attempts[slot.job.row], worker=slot.name))
        slot.job, slot.state = None, "idle"

    def _stop(self) -> None:
        live = [s.actor for s in self.slots if s.state == "idle"]
        try:
            self.ray.wait([a.close.remote() for a in live], num_returns=len(live), timeout=10)
        except Exception as exc:  # cleanup only: the actors are killed next anyway
            log.debug("worker close: %s", exc)
        for slot in self.slots:
            if slot.actor is not None:
                self.ray.kill(slot.actor, no_restart=True)


def _run_ray(jobs: list[BatchJob], outputs: _Outputs, config: GenerationConfig, models: str | os.PathLike | None,
             address: bool | str, workers: int | None, cpus_per_worker: float | None, retries: int, collect: bool,
             on_job_start: Callable[[JobStarted], None] | None) -> tuple[float, int]:
    """Every job on Ray actors; returns (when the first worker was ready (time.perf_counter), number of actors)."""
    ray = _import_ray()
    started_here = _connect(ray, address)
    try:
        count, options = plan_workers(ray.cluster_resources(), len(jobs), workers, cpus_per_worker)
        log.info("Ray: %d workers, each %s", count, options)
        # the workers read the weights themselves: an absolute path (every node needs it), or their own default
        models_path = str(Path(models).expanduser().resolve()) if models is not None else None
        scheduler = _RayScheduler(ray, jobs, outputs, config, models_path, count, options, retries, collect,
                                  on_job_start)
        scheduler.run()
        return scheduler.first_ready or time.perf_counter(), count
    finally:
        if started_here:
            ray.shutdown()
