"""Encoding prompts on Ray actors (`build-index --ray ADDRESS`).

The driver (the machine running build-index) keeps everything that decides the result: the name table, the
vectors files, progress.json and the indexes. The actors only turn (template, row range) into embeddings:
each loads the model itself (one GPU per actor where the cluster has GPUs, else a share of its CPUs), and
the driver writes what they return at the rows a single-process build would, through the same
`encode_template`, so the vectors layout, its commits and its resume are the ones of a build without Ray.

The work is cut into the batches a single-process build runs (`--batch-size` rows of one template, from
the row the build resumes at), so each actor runs the same forward passes; results are consumed in order,
a few batches per actor in flight ahead, also across templates, so that actors go on encoding the next
template while the driver builds the index of the last one.

Model files must be readable at the same path on every node (a local checkpoint on a shared file system,
or an open_clip tag / hf-hub id in each node's cache): every actor's weights fingerprint must equal the
driver's, or the build stops before anything is encoded.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from ..candidates.templates import render
from ..errors import ArtifactError, InputError
from ..model.load import DeviceChoice, LoadedModel, ModelSpec, Precision, load_model
from ..ray_cluster import ray_connection

log = logging.getLogger(__name__)

IN_FLIGHT_PER_ACTOR = 2  # batches queued on each actor: one running, one ready to start


@dataclass(frozen=True)
class ActorSetup:
    """How an actor encodes; all actors of a build must agree (and agree with the driver's weights)."""

    device: str  # "cpu" or "cuda"
    precision: str  # the resolved precision (fp32, fp16, bf16)
    text_path: str  # which text forward pass (TextPath value)
    fingerprint: str  # weights fingerprint
    threads: int  # torch intra-op threads (CPU actors)
    node: str  # the node it runs on


class PromptEncoderActor:
    """Runs on a Ray worker (wrapped with ray.remote by `RayPromptEncoders`): a model and the name table."""

    def __init__(self, spec: ModelSpec, precision: str, names: list[str], device: str, threads: int):
        import torch

        if device == "cpu":
            torch.set_num_threads(threads)
        self.model: LoadedModel = load_model(spec, device, precision)
        self.names = names
        self.threads = threads

    def setup(self) -> ActorSetup:
        import ray

        return ActorSetup(self.model.device.type, self.model.precision.value, self.model.text_path.value,
                          self.model.info.fingerprint, self.threads, ray.get_runtime_context().get_node_id())

    def encode(self, template: str, start: int, stop: int) -> np.ndarray:
        return self.model.encode_text([render(template, n) for n in self.names[start:stop]])


def actor_plan(total_cpus: float, total_gpus: float, device: DeviceChoice, actors: int, threads: int
               ) -> tuple[str, int, int]:
    """(device, actors, CPUs per actor) on a cluster with these resources. One actor per GPU when the cluster
    has GPUs (unless --device cpu). On CPUs, by default each actor runs `threads` torch threads (this
    machine's count) and there are as many as fit: float32 sums over as many threads are summed in the
    same order, so the vectors equal this machine's bit for bit (other thread counts change the last bits
    of ViT-B-32's). `actors` > 0 asks for that many, the CPUs shared among them."""
    device = DeviceChoice(device)
    if device is DeviceChoice.CUDA and total_gpus < 1:
        raise InputError("--device cuda with --ray: the Ray cluster has no GPU; use --device cpu or auto")
    on_gpu = device is not DeviceChoice.CPU and total_gpus >= 1
    if on_gpu:
        n = actors or int(total_gpus)
        if n > total_gpus:
            raise InputError(f"--ray-actors {n}: the Ray cluster has {int(total_gpus)} GPU(s), one per actor")
        return "cuda", n, 1
    cpus = int(total_cpus)
    if actors > cpus or cpus < 1:
        raise InputError(f"--ray-actors {actors}: the Ray cluster has {cpus} CPU(s), at least one per actor")
    if actors:
        return "cpu", actors, max(1, cpus // actors)
    threads = max(1, min(threads, cpus))
    return "cpu", cpus // threads, threads


class RayPromptEncoders:
    """Actors encoding one build's prompts; a context manager (connects, starts the actors, stops them)."""

    def __init__(self, address: str, actors: int, spec: ModelSpec, precision: Precision, device: DeviceChoice,
                 names: list[str], batch_size: int, local_cpus: int | None = None,
                 after_start: Callable[[RayPromptEncoders], None] | None = None):
        self.address, self.requested_actors, self.spec = address, actors, spec
        self.precision = Precision(precision)
        self.device, self.names, self.batch_size = device, names, batch_size
        self.local_cpus = local_cpus or actors or os.cpu_count() or 1
        self._queue: deque[tuple[int, str, int, int]] = deque()  # (template id, template, start, stop) to submit
        self._in_flight: deque[tuple[int, int, object]] = deque()  # (template id, start, result ref), in order
        self._next = 0
        self._after_start = after_start  # a check of the actors' setup; on failure they are stopped again

    def __enter__(self) -> RayPromptEncoders:
        import torch

        self._connection = ray_connection(self.address, self.local_cpus)
        ray = self._ray = self._connection.__enter__()
        try:
            resources = ray.cluster_resources()
            device, n, cpus = actor_plan(resources.get("CPU", 0), resources.get("GPU", 0), self.device,
                                         self.requested_actors, torch.get_num_threads())
            actor_cls = ray.remote(PromptEncoderActor).options(num_cpus=cpus, num_gpus=1 if device == "cuda" else 0)
            names_ref = ray.put(self.names)
            self.actors = [actor_cls.remote(self.spec, self.precision.value, names_ref, device, cpus)
                           for _ in range(n)]
            try:
                self.setups = ray.get([a.setup.remote() for a in self.actors])
            except ray.exceptions.RayError as e:
                raise InputError(f"a Ray actor could not load model {self.spec.model}: {_cause(e)}") from None
            self.setup  # noqa: B018 - actors that disagree are an error now, not at the first batch
            if self._after_start is not None:
                self._after_start(self)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        log.info("encoding on %d Ray actor(s) at %s: %s", len(self.actors), self.address, self.setups[0])
        return self

    def __exit__(self, *exc) -> None:
        for actor in getattr(self, "actors", []):
            self._ray.kill(actor)
        self._connection.__exit__(*exc)

    @property
    def setup(self) -> ActorSetup:
        """The actors' common setup; a one-line error if they differ from each other or from `driver`."""
        first = self.setups[0]
        for other in self.setups[1:]:
            mismatch = {k: (v, getattr(other, k)) for k, v in asdict(first).items()
                        if k not in ("node",) and v != getattr(other, k)}
            if mismatch:
                raise InputError(f"Ray actors encode differently ({mismatch}); give every node the same model "
                                 "files, library versions and hardware, or pin --device/--precision")
        return first

    def check_weights(self, driver: LoadedModel) -> None:
        if self.setup.fingerprint != driver.info.fingerprint:
            raise InputError(f"the Ray actors loaded other weights than this machine for model {driver.info.model} "
                             f"({driver.info.pretrained}): fingerprint {self.setup.fingerprint[:12]} vs "
                             f"{driver.info.fingerprint[:12]}; give every node the same model files at the same path")

    def describe(self) -> dict:
        s = self.setup
        return {"address": self.address, "actors": len(self.actors), "device": s.device, "threads_per_actor": s.threads,
                "nodes": len({x.node for x in self.setups})}

    # --- the work, in the order a single-process build does it ---------------------------------------------

    def plan(self, work: list[tuple[int, str, int]]) -> None:
        """Queue (template id, template, first row) for every template still to encode, in build order."""
        n = len(self.names)
        for t, template, start_row in work:
            for start in range(start_row, n, self.batch_size):
                self._queue.append((t, template, start, min(n, start + self.batch_size)))
        self._fill()

    def _fill(self) -> None:
        while self._queue and len(self._in_flight) < IN_FLIGHT_PER_ACTOR * len(self.actors):
            t, template, start, stop = self._queue.popleft()
            actor = self.actors[self._next % len(self.actors)]
            self._next += 1
            self._in_flight.append((t, start, actor.encode.remote(template, start, stop)))

    def batches(self, t: int, start_row: int) -> Iterator[np.ndarray]:
        """Template t's embeddings from `start_row` on, batch after batch, as `plan` queued them."""
        for start in range(start_row, len(self.names), self.batch_size):
            if not self._in_flight:
                raise RuntimeError(f"no Ray batch queued for template {t} row {start}: plan() was not told of it")
            queued_t, queued_start, ref = self._in_flight.popleft()
            if (queued_t, queued_start) != (t, start):
                raise RuntimeError(f"Ray batches out of order: expected template {t} row {start}, "
                                   f"got template {queued_t} row {queued_start}")
            try:
                emb = self._ray.get(ref)
            except self._ray.exceptions.RayError as e:
                raise ArtifactError(f"a Ray actor failed encoding template {t} rows {start}..: {_cause(e)}; what "
                                    "was committed stays, and a rerun of the same command resumes there") from None
            self._fill()
            yield emb


def _cause(e: BaseException) -> str:
    """The first line of what went wrong inside Ray (its exceptions wrap the worker's in a traceback)."""
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"
