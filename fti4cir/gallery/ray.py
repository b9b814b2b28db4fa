"""`fti4cir index --ray`: compute a gallery's missing images on a Ray cluster.

Ray actors each hold one model (built from the driver's `ModelSpec` with `fti4cir.factory.create_model`, checked to
be identical by parameter digest). The driver sends shards of (path, content hash); an actor reads the files where
they are (the paths must resolve on every node: a shared file system), runs one visual pass per image and the
inversion, and returns the shard's rows. The driver writes each shard atomically into the gallery's staging folder,
named by its images' hashes, then merges the shards into the gallery exactly as a single-process build does. Shards
already staged are not sent again, so a rerun after a failure (of the driver or of workers) resumes; a retried task
rewrites the same shard.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError
from .identity import describe_identity, gallery_identity, identity_differences
from .shards import shard_arrays, write_shard

if TYPE_CHECKING:
    from ..spec import ModelSpec


def runtime_env() -> dict:
    """For ray.init: ships the fti4cir package to the workers (the nodes need only its dependencies installed)."""
    return {"py_modules": [str(Path(__file__).resolve().parents[1])]}


def _model(model_spec: ModelSpec | dict):
    """The model of a spec, built exactly as the driver builds it (`fti4cir.factory.create_model`)."""
    from ..factory import create_model
    from ..spec import ModelSpec

    return create_model(model_spec if isinstance(model_spec, ModelSpec) else ModelSpec.from_dict(model_spec))


class IndexWorker:
    """Body of a Ray actor: one model, shards of images in, gallery rows out."""

    def __init__(self, model_spec: ModelSpec | dict, batch_size: int, threads: int):
        import torch

        torch.set_num_threads(threads)  # the actor's CPU share: actors side by side must not oversubscribe a node
        self.model = _model(model_spec)
        self.batch_size = batch_size

    def identity(self) -> dict:
        return gallery_identity(self.model)

    def process(self, paths: list[str]):
        """-> (content hash of each path or None when unreadable, gallery rows of the readable ones, failures
        [(path, message)])."""
        from ..features import FeatureStore, extract_features

        scratch = tempfile.mkdtemp(prefix="fti4cir-shard-")
        try:
            store = FeatureStore.for_model(scratch, self.model, with_patches=True)
            result = extract_features(
                self.model, paths, store, batch_size=self.batch_size, num_workers=0, progress=False
            )
            ok = result.rows >= 0
            arrays = shard_arrays(self.model, store.get(result.rows[ok]), self.batch_size) if ok.any() else None
            hashes = [h if good else None for h, good in zip(result.hashes, ok)]
            return hashes, arrays, [(str(p), message) for p, message in result.failures]
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


@dataclass
class RayCompute:
    """How `build_gallery` reaches Ray. address: None uses RAY_ADDRESS or starts a local instance; 'auto' joins the
    cluster this node belongs to; 'ray://head:10001' is a remote client. An already initialised Ray is used as is
    (initialise it with `runtime_env=runtime_env()` unless fti4cir is installed on the workers)."""

    model_spec: ModelSpec | dict  # what the driver's model was built from (a dict: `ModelSpec.to_dict()`)
    address: str | None = None
    num_workers: int | None = None
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    batch_size: int = 32

    def compute(
        self, identity: dict, todo: list[tuple[Path, str]], staging: Path, *, shard_size: int, bar
    ) -> list[tuple[str, str]]:
        """Stage the gallery rows of `todo` [(path, content hash)] as shards in `staging`; returns the failures."""
        import ray
        from ray.util import ActorPool

        started = not ray.is_initialized()
        if started:
            ray.init(address=self.address, log_to_driver=False, runtime_env=runtime_env())
        actors = []
        try:
            actors = self._start_actors(ray)
            for worker_identity in ray.get([a.identity.remote() for a in actors]):
                if identity_differences(worker_identity, identity):
                    raise UserError(
                        f"A Ray worker built another model ({describe_identity(worker_identity)}) than "
                        f"this process ({describe_identity(identity)}): the model flags and weight files "
                        f"must resolve to the same files on every node"
                    )
            chunks = [todo[i : i + shard_size] for i in range(0, len(todo), shard_size)]
            failures: list[tuple[str, str]] = []
            pool = ActorPool(actors)
            # map (not map_unordered): results come back in chunk order, so each pairs with its chunk
            for chunk, (hashes, arrays, failed) in zip(
                chunks, pool.map(lambda actor, chunk: actor.process.remote([str(p) for p, _ in chunk]), chunks)
            ):
                if arrays is not None:
                    write_shard(staging, [h for h in hashes if h is not None], arrays)
                failures += failed
                failures += [
                    (
                        str(p),
                        f"{p}: its content on the Ray worker differs from this machine's (not the same file system?)",
                    )
                    for (p, expected), h in zip(chunk, hashes)
                    if h and h != expected
                ]
                bar.update(len(chunk))
            return failures
        finally:
            for actor in actors:  # free the cluster's slots (and the models' memory) for other jobs
                ray.kill(actor)
            if started:
                ray.shutdown()

    def _start_actors(self, ray) -> list:
        count = self.num_workers
        if count is None:
            resources = ray.cluster_resources()
            count = int(resources.get("CPU", 1) // max(self.cpus_per_worker, 1e-9))
            if self.gpus_per_worker:
                count = min(count, int(resources.get("GPU", 0) // self.gpus_per_worker))
        if count < 1:
            raise UserError(
                f"The Ray cluster has no room for a worker with {self.cpus_per_worker} CPU(s) and "
                f"{self.gpus_per_worker} GPU(s): {ray.cluster_resources()}"
            )
        actor = ray.remote(IndexWorker).options(
            num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker, max_restarts=2, max_task_retries=2
        )
        threads = max(1, int(self.cpus_per_worker))
        return [actor.remote(self.model_spec, self.batch_size, threads) for _ in range(count)]
