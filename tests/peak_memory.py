"""Peak memory of one request per image file: `python tests/peak_memory.py FILE...` prints JSON
{file name: {"peak": bytes, "seconds": s, "result": "...")}}.

A request is what the app does with an upload before the model runs: `load_image` on the file's bytes, then both
preprocessing transforms. Each file is measured in this one process: freed memory is handed back to the system
(malloc_trim; run with MALLOC_MMAP_THRESHOLD_=131072 so that large blocks are mapped and unmapped), the peak
resident size is reset through /proc/self/clear_refs, and the peak reached during the request minus the resident
size before it is the request's peak."""

import ctypes
import json
import sys
import time
from pathlib import Path

from PIL import Image

from fti4cir.errors import UserError
from fti4cir.inputs import load_image
from fti4cir.preprocess import make_transform


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main(paths: list[str]) -> dict:
    libc = ctypes.CDLL("libc.so.6")
    transforms = [make_transform("targetpad", 224), make_transform("clip", 224)]
    for transform in transforms:  # lazy imports and first-call allocations outside the measurement
        transform(Image.new("RGB", (64, 48)))
    out = {}
    for path in paths:
        data = Path(path).read_bytes()
        libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        before, start = _status("VmRSS"), time.perf_counter()
        try:
            image = load_image(data)
            result = str([tuple(t(image).shape) for t in transforms])
        except UserError as e:
            result = f"UserError: {e}"
        image = None
        out[Path(path).name] = {
            "peak": _status("VmHWM") - before,
            "seconds": time.perf_counter() - start,
            "result": result,
        }
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
