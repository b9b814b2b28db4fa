"""Training stage 1: BLIP captions for a folder of unlabeled images, as a resumable, crash-safe JSONL file.

Each line is ``{"image": <path relative to the folder, posix>, "sha1": <hex digest of the file>, "caption": ...}``.
A rerun skips the images already in the file (by relative path; the file's content is not re-hashed). Lines are
appended a batch at a time with flush + fsync, so a kill -9 loses at most the batch in flight; a torn last line left by
such a kill is cut off (one truncate, itself atomic) before the run continues. A lock on the file keeps two runs from
appending to it at once.

Parity with the official ``src/blip_caption.py``:

- images are opened with PIL, made RGB and go through the "targetpad" transform (ratio 1.25, resize, center crop) at
  the BLIP input size with CLIP's mean/std, which are also BLIP's. BlipProcessor's own plain square resize is not used;
- the text decoder is prompted with "a picture of " (what BLIP's ``blip_decoder`` does), the prompt is removed from
  the output; beam search with 3 beams, min length 10 and max length 25 tokens, both counting the prompt, as there;
- the official checkpoint is BLIP ViT-B CapFilt-L (``model_base_capfilt_large.pth``, the checkpoint HF's BLIP
  conversion script converts); ``--model`` defaults to the larger ViT-L captioner as the issue asks.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError
from ..imagefiles import list_images

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# torch, PIL, the image transform and tqdm are imported where used: `fti4cir caption --help` stays fast

DEFAULT_MODEL = "Salesforce/blip-image-captioning-large"
TINY_MODEL = "tiny-random"
PROMPT = "a picture of "
LOADER_THREADS = 4

# Words of the tiny model's vocabulary: enough nouns, adjectives, verbs and prepositions that its random captions
# split into subject/attribute like real ones do.
_TINY_WORDS = (
    "a an the of with on in near and picture photo dog cat man woman child bird car bus tree street table chair shirt "
    "dress hat shoe bag grass water sky wall field room red blue green white black small large wooden striped old "
    "young sitting standing holding wearing walking looking lying is two three"
).split()


# ---- models -------------------------------------------------------------------------------------------------------
def make_tiny_blip(seed: int = 0):
    """A tiny random-weight BLIP captioner and its processor, built without any download (tests, offline demos).

    The weight init is wider than BLIP's default so that the captions depend visibly on the image.
    """
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    vocab = {token: i for i, token in enumerate(specials + list(_TINY_WORDS))}
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]")
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    init = 0.2
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=64,
            initializer_range=init,
            bos_token_id=vocab["[DEC]"],
            eos_token_id=vocab["[SEP]"],
            sep_token_id=vocab["[SEP]"],
            pad_token_id=vocab["[PAD]"],
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            initializer_range=init,
        ),
        projection_dim=32,
        image_text_hidden_size=32,
        initializer_range=init,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(config)
    return model.eval(), processor


def resolve_device(name: str = "auto") -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as e:
        raise UserError(f"Unknown device '{name}' (use auto, cpu, cuda or cuda:N)") from e


def _from_pretrained(source: str, **kwargs):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(source, **kwargs)
    model = BlipForConditionalGeneration.from_pretrained(source, **kwargs)
    return model, processor


def load_blip(model_id_or_path: str = DEFAULT_MODEL, device: str | torch.device = "cpu"):
    """(model, processor) in eval mode on `device`, from "tiny-random", a local folder or a Hugging Face hub id.

    A hub id is looked up in the local cache first; the network is tried only when the hub answers quickly (and
    HF_HUB_OFFLINE is not set), so a closed network raises a UserError at once instead of hanging in retries.
    """
    import torch

    from ..hub import reachable

    device = torch.device(device)
    if model_id_or_path == TINY_MODEL:
        model, processor = make_tiny_blip()
        return model.to(device), processor
    local = Path(model_id_or_path).expanduser()
    if local.is_dir():
        try:
            model, processor = _from_pretrained(str(local), local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(
                f"Could not load a BLIP captioner from folder {local}: {e}\nThe folder needs the files of "
                f"BlipForConditionalGeneration.save_pretrained and BlipProcessor.save_pretrained."
            ) from e
        return model.eval().to(device), processor

    errors = [f"local folder {local.resolve()}: {'not a folder' if local.exists() else 'does not exist'}"]
    try:
        model, processor = _from_pretrained(model_id_or_path, local_files_only=True)
        return model.eval().to(device), processor
    except (OSError, ValueError) as e:
        errors.append(f"hub id '{model_id_or_path}' in the Hugging Face cache: not found ({type(e).__name__})")
    if not reachable():
        errors.append("download: hub unreachable or HF_HUB_OFFLINE set")
    else:
        try:
            model, processor = _from_pretrained(model_id_or_path)
            return model.eval().to(device), processor
        except (OSError, ValueError) as e:
            errors.append(f"download of '{model_id_or_path}': {e}")
    raise UserError(
        f"Could not load the BLIP captioner '{model_id_or_path}'. Tried:\n  - " + "\n  - ".join(errors) + "\n"
        f"Pass a local copy instead: --model /path/to/blip-image-captioning-large (a folder with config.json, the "
        f"weights and the processor files, e.g. from `hf download {DEFAULT_MODEL} --local-dir DIR` on a machine with "
        f"network access), or --model {TINY_MODEL} for a tiny random model (tests only)."
    )


# ---- captioning ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Captioned:
    path: Path
    sha1: str
    caption: str


@dataclass(frozen=True)
class BadImage:
    path: Path
    error: str


@dataclass
class CaptionBatch:
    captioned: list[Captioned] = field(default_factory=list)
    bad: list[BadImage] = field(default_factory=list)


def _load(path: Path, transform) -> tuple[Path, str, torch.Tensor] | BadImage:
    """Read, hash and preprocess one image; anything that fails to decode becomes a BadImage."""
    import PIL.Image

    from ..preprocess import to_rgb

    try:
        data = path.read_bytes()
        with PIL.Image.open(io.BytesIO(data)) as image:
            image.load()
            rgb = to_rgb(image)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files; one bad file must not stop a run
        return BadImage(path, f"{type(e).__name__}: {e}")
    return path, hashlib.sha1(data).hexdigest(), transform(rgb)


def _prefetched(items: Iterable, fn, depth: int, threads: int) -> Iterator:
    """`map(fn, items)` in order, computed by a thread pool at most `depth` items ahead (bounded memory)."""
    with ThreadPoolExecutor(threads) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def image_size(processor) -> int:
    size = processor.image_processor.size
    if size.get("height") != size.get("width"):
        raise UserError(f"BLIP processor with a non-square input size {size} is not supported")
    return int(size["height"])


def caption_images(
    image_paths: Iterable[str | os.PathLike],
    model,
    processor,
    *,
    batch_size: int = 16,
    num_beams: int = 3,
    min_length: int = 10,
    max_length: int = 25,
    prompt: str = PROMPT,
) -> Iterator[CaptionBatch]:
    """Caption images batch by batch; yields one CaptionBatch per `batch_size` input paths.

    Images that cannot be read or decoded are returned in `bad` and never stop the run. Images are decoded by a few
    threads while the model runs.
    """
    import torch

    from ..preprocess import make_transform

    device = next(model.parameters()).device
    transform = make_transform("targetpad", image_size(processor))
    tokenizer = processor.tokenizer
    prompt_ids = tokenizer(prompt, return_tensors="pt").input_ids  # [CLS] prompt [SEP]; generate() swaps/drops both
    kept_prefix = prompt_ids.shape[1] - 1  # generate() returns [DEC] + prompt + caption
    loaded = _prefetched((Path(p) for p in image_paths), lambda p: _load(p, transform), 2 * batch_size, LOADER_THREADS)
    while True:
        chunk = [item for _, item in zip(range(batch_size), loaded)]
        if not chunk:
            return
        batch = CaptionBatch(bad=[item for item in chunk if isinstance(item, BadImage)])
        good = [item for item in chunk if not isinstance(item, BadImage)]
        if good:
            pixels = torch.stack([pixels for _, _, pixels in good]).to(device, next(model.parameters()).dtype)
            with torch.no_grad():
                output = model.generate(
                    pixel_values=pixels,
                    input_ids=prompt_ids.repeat(len(good), 1).to(device),
                    num_beams=num_beams,
                    min_length=min_length,
                    max_length=max_length,
                    do_sample=False,
                    repetition_penalty=1.0,
                )
            texts = tokenizer.batch_decode(output[:, kept_prefix:], skip_special_tokens=True)
            batch.captioned = [Captioned(path, sha1, text.strip()) for (path, sha1, _), text in zip(good, texts)]
        yield batch


# ---- the JSONL file -----------------------------------------------------------------------------------------------
def _parse_record(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not (
        isinstance(record, dict)
        and isinstance(record.get("image"), str)
        and isinstance(record.get("sha1"), str)
        and isinstance(record.get("caption"), str)
    ):
        return None
    return record


def parse_caption_lines(data: bytes, source: str | os.PathLike) -> tuple[list[dict], int]:
    """Records of a captions file's bytes and the byte length of its valid part.

    A bad last line (no newline at the end, or not a caption record: a write torn by a kill) ends the valid part;
    a bad line anywhere else is corruption we did not cause and raises a UserError.
    """
    records, valid_end, offset = [], 0, 0
    lines = data.splitlines(keepends=True)
    for number, line in enumerate(lines, start=1):
        record = _parse_record(line) if line.endswith(b"\n") else None
        if record is None and line.strip(b"\0 \t\r\n"):
            if number == len(lines):
                break
            raise UserError(f"{source} line {number} is not a caption record; fix or delete the line and rerun")
        offset += len(line)
        if record is not None:
            records.append(record)
            valid_end = offset
    return records, valid_end


def read_captions(path: str | os.PathLike) -> tuple[list[dict], bool]:
    """The caption records of a file (read only) and whether it ends in a torn line, which is left out."""
    data = Path(path).read_bytes()
    records, valid_end = parse_caption_lines(data, path)
    return records, valid_end != len(data)


class CaptionWriter:
    """Append-only, locked, fsync'ed writer of a captions file; repairs a torn tail on open."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+b")  # noqa: SIM115 - closed in close()
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise UserError(f"{self.path} is being written by another caption run") from None
        self._file.seek(0)
        data = self._file.read()
        self.records, valid_end = parse_caption_lines(data, self.path)
        self.repaired = valid_end != len(data)
        if self.repaired:
            os.ftruncate(self._file.fileno(), valid_end)
            os.fsync(self._file.fileno())

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        self._file.write(b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in records))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()  # also releases the lock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class CaptionSummary:
    total: int  # images in the folder (after --limit)
    already_done: int
    captioned: int
    bad: list[BadImage]
    repaired: bool  # a torn last line was cut off


def caption_folder(
    images_dir: str | os.PathLike,
    out: str | os.PathLike,
    model,
    processor,
    *,
    limit: int | None = None,
    batch_size: int = 16,
    **generate_kwargs,
) -> CaptionSummary:
    """Caption every image under `images_dir` not yet in `out`, appending to `out` batch by batch."""
    from tqdm import tqdm

    images_dir = Path(images_dir)
    paths = list_images(images_dir)
    if limit is not None:
        paths = paths[:limit]
    if not paths:
        raise UserError(f"No images found under {images_dir}")
    with CaptionWriter(out) as writer:
        done = {record["image"] for record in writer.records}
        todo = [p for p in paths if p.relative_to(images_dir).as_posix() not in done]
        summary = CaptionSummary(len(paths), len(paths) - len(todo), 0, [], writer.repaired)
        if writer.repaired:
            log.warning("%s: removed a torn last line left by an interrupted run", out)
        with tqdm(total=len(todo), unit="img", desc="caption", dynamic_ncols=True) as bar:
            for batch in caption_images(todo, model, processor, batch_size=batch_size, **generate_kwargs):
                writer.append(
                    [
                        {"image": c.path.relative_to(images_dir).as_posix(), "sha1": c.sha1, "caption": c.caption}
                        for c in batch.captioned
                    ]
                )
                for bad in batch.bad:
                    tqdm.write(f"skipping bad image {bad.path.relative_to(images_dir)}: {bad.error}", file=sys.stderr)
                summary.captioned += len(batch.captioned)
                summary.bad += batch.bad
                bar.update(len(batch.captioned) + len(batch.bad))
    return summary
