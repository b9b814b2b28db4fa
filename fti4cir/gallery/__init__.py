"""Galleries: a folder of images (or a benchmark split) indexed once, searched by every query.

`fti4cir index SOURCE --name NAME` writes `galleries/NAME/`; `Gallery.load(NAME, model)` opens it.

    store        the format (CURRENT -> an immutable version folder) and the reader `Gallery`; names
    identity     the model identity a gallery records, and the check that a model matches it
    definition   definition files `galleries/<name>.json`, and the model a gallery knows (`gallery_model_spec`)
    source       what a gallery is built from: an image folder, or named files (a benchmark split, resolved by the
                 caller: this package does not read benchmarks)
    shards       per-image rows (pseudo tokens + explanation data) and the staged shards of a build
    build        `build_gallery`: crash-safe, incremental, locally or on Ray
    ray          `RayCompute`: a build's missing images computed by Ray actors (imported on its own:
                 `fti4cir.gallery.ray`)

Layering: store <- identity; shards <- store; build <- store, identity, shards, source; definition <- store; ray <-
identity, shards. Nothing here imports the command line or `fti4cir.evaluation`.
"""

from __future__ import annotations

from .build import INDEX_KINDS, SHOWN_FAILURES, BuildReport, build_gallery
from .definition import (
    DEFINITION_KEYS,
    NotRecorded,
    definition_model_spec,
    gallery_model_spec,
    not_recorded,
    read_definition,
)
from .identity import (
    check_compatible,
    describe_identity,
    gallery_identity,
    identity_differences,
    identity_key,
    weights_label,
)
from .shards import explain_meta, row_shapes, shard_arrays, staged_hashes, write_shard
from .source import Source, SourceImage, folder_source, named_source
from .store import ARRAYS, CURRENT, FORMAT_VERSION, INDEX_FILE, Gallery, is_valid_name, list_galleries, validate_name

__all__ = [
    "ARRAYS",
    "CURRENT",
    "DEFINITION_KEYS",
    "FORMAT_VERSION",
    "INDEX_FILE",
    "INDEX_KINDS",
    "SHOWN_FAILURES",
    "BuildReport",
    "Gallery",
    "NotRecorded",
    "Source",
    "SourceImage",
    "build_gallery",
    "check_compatible",
    "definition_model_spec",
    "describe_identity",
    "explain_meta",
    "folder_source",
    "gallery_identity",
    "gallery_model_spec",
    "identity_differences",
    "identity_key",
    "is_valid_name",
    "list_galleries",
    "named_source",
    "not_recorded",
    "read_definition",
    "row_shapes",
    "shard_arrays",
    "staged_hashes",
    "validate_name",
    "weights_label",
    "write_shard",
]
