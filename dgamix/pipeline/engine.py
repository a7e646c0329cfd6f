"""Where a stage's per-shard work runs: here, one shard after another (`local`), or on a Ray cluster (`ray`).

The stages do not change with the engine: each gives the engine a list of independent items (an input file, a
docs shard, a domains shard) and a function of one item that reads its inputs and writes its own outputs
atomically; the stage's driver plans the items beforehand and commits (manifest, metrics, final rename) after.
The same function runs either way, so both engines write the same bytes.

With `ray`, items run as Ray Data `map_batches` (one item per batch): plain tasks for stateless work, an actor pool
for work that loads a model once (embed; one model per actor, GPU actors when asked). The cluster is the one named
by `ray.address` or the usual RAY_ADDRESS, else a local Ray started for the stage. A task whose worker dies is
retried `ray.max_retries` times; if it still fails, the stage fails: what finished is kept (and skipped by a
re-run where the stage resumes per shard), nothing half-written is left in the outputs.

Fault injection for tests and drills (Ray engine only): DGAMIX_INJECT_FAILURE="<stage>:<item index>" makes the
worker that runs that item die (os._exit, like a killed machine) before it writes anything. Items are the stage's
pending work in order (for embed, the shards not yet done). "<stage>:<index>:once" dies only on the first attempt
(a marker file in DGAMIX_INJECT_FAILURE_DIR, default the driver's working directory, records it), so Ray's retry
completes the stage.
"""
from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

from tqdm.auto import tqdm

from ..core.config import load
from ..core.errors import InputError, ParamError, StageFailed
from ..core.sections import RayConfig

log = logging.getLogger(__name__)

FAULT_ENV = "DGAMIX_INJECT_FAILURE"
FAULT_DIR_ENV = "DGAMIX_INJECT_FAILURE_DIR"


class Fault(NamedTuple):
    """The DGAMIX_INJECT_FAILURE spec that concerns a stage, as it travels to the workers."""

    index: int  # the item whose worker dies
    once: bool  # die on the first attempt only (Ray's retry then completes the stage)
    marker_dir: str  # where the first attempt leaves its marker (absolute: resolved in the driver)
    stage: str


class Engine:
    """Runs `fn(item)` for every item of a stage and returns the results in item order."""

    def __init__(self, stage: str, kind: str = "local", options: RayConfig | None = None):
        self.stage, self.kind = stage, kind
        self.options = options or RayConfig()

    @classmethod
    def for_stage(cls, params: dict[str, Any], stage: str, kind: str) -> "Engine":
        """The engine `kind` (the stage section's `engine`, checked when the section was loaded) for `stage`; with
        ray, the `ray` section of `params` says which cluster and how."""
        return cls(stage, kind, load(RayConfig, params.get("ray"), "ray") if kind == "ray" else None)

    def cluster_gpus(self) -> int:
        """GPUs of the Ray cluster (the local engine uses this machine's through torch)."""
        return int(connect(self.options).cluster_resources().get("GPU", 0))

    def imap(self, fn: Callable[[Any], Any], items: Sequence[Any], desc: str, weights: Sequence[int] | None = None,
             unit: str = "item") -> Iterator[Any]:
        """Stateless work, results yielded in item order as they become available (so the driver can commit as
        it goes instead of holding every result). `fn` must be picklable (a module-level function or callable
        object, or a functools.partial of one)."""
        if self.kind == "local":
            return _iter_local(lambda: fn, items, desc, weights, unit)
        return self._iter_ray(_call_task, {"fn": fn}, False, items, desc, weights, unit, num_gpus=0)

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any], desc: str, weights: Sequence[int] | None = None,
            unit: str = "item") -> list[Any]:
        return list(self.imap(fn, items, desc, weights, unit))

    def map_with_state(self, make_state: Callable[[], Callable[[Any], Any]], items: Sequence[Any], desc: str,
                       weights: Sequence[int] | None = None, unit: str = "item", num_gpus: float = 0) -> list[Any]:
        """Work that loads something heavy once (a model): `make_state()` builds a callable, once per actor."""
        if self.kind == "local":
            return list(_iter_local(make_state, items, desc, weights, unit))
        return list(self._iter_ray(_ActorCaller, {"make_state": make_state}, True, items, desc, weights, unit,
                                   num_gpus))

    def _iter_ray(self, udf: Any, udf_args: dict[str, Any], stateful: bool, items: Sequence[Any], desc: str,
                  weights: Sequence[int] | None, unit: str, num_gpus: float) -> Iterator[Any]:
        if not items:
            return
        ray = connect(self.options)  # with ray.data imported
        fault = _fault_for(self.stage)
        rows = [{"index": i, "payload": pickle.dumps(item)} for i, item in enumerate(items)]
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows))
        # Default: one worker per CPU of the cluster, or one actor per GPU for GPU work.
        resources = ray.cluster_resources()
        capacity = resources.get("GPU", 0) / num_gpus if num_gpus else resources.get("CPU", 1)
        concurrency = self.options.concurrency or max(1, int(capacity))
        concurrency = min(concurrency, len(rows))
        retries = self.options.max_retries
        if stateful:  # an actor pool: the state is built once per actor; a dead actor is restarted
            kwargs: dict[str, Any] = {"fn_constructor_kwargs": {**udf_args, "fault": fault}, "max_restarts": retries,
                                      "max_task_retries": retries,
                                      "compute": ray.data.ActorPoolStrategy(size=concurrency)}
        else:  # plain tasks, retried when their worker dies
            kwargs = {"fn_kwargs": {**udf_args, "fault": fault}, "max_retries": retries,
                      "compute": ray.data.TaskPoolStrategy(size=concurrency)}
        if num_gpus:
            kwargs["num_gpus"] = num_gpus
        log.info("%s: %d items on Ray (%s, concurrency %d)", self.stage, len(rows),
                 self.options.address or os.environ.get("RAY_ADDRESS") or "local Ray", concurrency)
        waiting: dict[int, Any] = {}  # finished out of order, held until the items before them are done
        finished = next_index = 0
        total = sum(weights) if weights is not None else len(items)
        with tqdm(total=total, desc=f"{desc} (ray)", unit=unit if weights is not None else "task") as bar:
            batches = iter(dataset.map_batches(udf, batch_size=1, **kwargs).iter_batches(batch_size=1,
                                                                                         batch_format="numpy"))
            while next_index < len(items):
                try:
                    batch = next(batches)
                except Exception as err:  # StopIteration included: Ray ended without every item
                    raise StageFailed(
                        f"{self.stage}: a task failed on Ray (a dead worker is retried {retries} times) and "
                        f"{finished} of {len(items)} items finished; finished work is kept, re-run to complete: "
                        f"{_last_line(err)}") from err
                index = int(batch["index"][0])
                waiting[index] = pickle.loads(batch["result"][0])
                finished += 1
                bar.update(weights[index] if weights is not None else 1)
                while next_index in waiting:
                    result = waiting.pop(next_index)
                    if isinstance(result, _StageError):  # bad input or parameters: the local engine's error
                        raise result.error
                    yield result
                    next_index += 1


def connect(options: RayConfig) -> Any:
    """Join the cluster (ray.address, else RAY_ADDRESS, else a new local Ray); reuse a connection already made."""
    try:
        import ray
    except ImportError as err:
        raise ParamError(f"engine: ray needs the ray extra: pip install 'dgamix[ray]' ({err})") from err
    if not ray.is_initialized():
        address = options.address or os.environ.get("RAY_ADDRESS")
        init: dict[str, Any] = {"address": address, "log_to_driver": False, "include_dashboard": False,
                                "logging_level": logging.WARNING}
        if not address and options.num_cpus:
            init["num_cpus"] = options.num_cpus
        if options.runtime_env:
            init["runtime_env"] = options.runtime_env
        ray.init(**init)
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours counts documents, Ray's would count batches
    return ray


def _iter_local(make_state: Callable[[], Callable[[Any], Any]], items: Sequence[Any], desc: str,
                weights: Sequence[int] | None, unit: str) -> Iterator[Any]:
    if not items:
        return
    call = make_state()
    # A callable with an `on_progress` slot reports its own progress (finer than one item); others move by item.
    reports = hasattr(call, "on_progress")
    total = sum(weights) if weights is not None else (None if reports else len(items))
    with tqdm(total=total, desc=desc, unit=unit) as bar:
        if reports:
            call.on_progress = bar.update
        for i, item in enumerate(items):
            result = call(item)
            if not reports:
                bar.update(weights[i] if weights is not None else 1)
            yield result


def _fault_for(stage: str) -> Fault | None:
    """The DGAMIX_INJECT_FAILURE spec that concerns this stage, if any."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    parts = spec.split(":")
    if len(parts) not in (2, 3) or not parts[1].isdigit() or (len(parts) == 3 and parts[2] != "once"):
        raise ParamError(f"{FAULT_ENV} = '{spec}': expected '<stage>:<item index>' or '<stage>:<item index>:once'")
    if parts[0] != stage:
        return None
    # The marker directory is resolved here, in the driver: a worker's working directory is not ours.
    return Fault(index=int(parts[1]), once=len(parts) == 3,
                 marker_dir=os.path.abspath(os.environ.get(FAULT_DIR_ENV, ".")), stage=stage)


def _maybe_die(fault: Fault | None, index: int) -> None:
    if fault is None or fault.index != index:
        return
    if fault.once:
        marker = Path(fault.marker_dir) / f"{fault.stage}-{index}.injected"
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    os._exit(75)  # no cleanup, no exception: the worker vanishes as if its machine went away


class _StageError:
    """A ParamError / InputError raised by the stage's own code in a worker, carried back to the driver as a
    result (Ray would wrap it, and retrying it cannot help)."""

    def __init__(self, error: Exception):
        self.error = error


def _call(fn: Callable[[Any], Any], batch: dict[str, Any]) -> dict[str, Any]:
    index = int(batch["index"][0])
    try:
        result = fn(pickle.loads(batch["payload"][0]))
    except (ParamError, InputError) as err:
        result = _StageError(err)
    return {"index": [index], "result": [pickle.dumps(result)]}


def _call_task(batch: dict[str, Any], fn: Callable[[Any], Any], fault: Fault | None) -> dict[str, Any]:
    _maybe_die(fault, int(batch["index"][0]))
    return _call(fn, batch)


class _ActorCaller:
    """One per Ray actor: builds the state (e.g. loads the model) once, then handles one item per call."""

    def __init__(self, make_state: Callable[[], Callable[[Any], Any]], fault: Fault | None):
        self.fault = fault
        try:
            self.call = make_state()
            self.error = None
        except (ParamError, InputError) as err:  # e.g. a model that cannot be loaded: say so, do not restart
            self.call, self.error = None, err

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        _maybe_die(self.fault, int(batch["index"][0]))
        if self.error is not None:
            return {"index": [int(batch["index"][0])], "result": [pickle.dumps(_StageError(self.error))]}
        return _call(self.call, batch)


def _last_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__
