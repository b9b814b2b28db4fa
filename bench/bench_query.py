"""Query latency: our one-pass query path vs the official path vs the floor, on real-sized random-weight backbones.

1. Uploaded reference (image tensor -> query vector), batch 1:
   - floor: one bare `encode_image` (what any CLIP retrieval must pay),
   - ours: `compose` (one visual pass for global feature + patch tokens, batched inversion, truncated text pass),
   - official: `fti4cir.official.official_compose` (visual tower twice, per-sample loops, 77-token text pass).
2. Gallery reference (pseudo tokens cached in the gallery): `compose` from cached tokens vs one truncated text pass of
   the same sentence (the floor for any text-side query).
Preprocessing (decode + resize) is the same for all paths and left out. Timing does not depend on weight values.
"""
from __future__ import annotations


import torch

from bench.common import bench_main, machine_info, markdown_table, percentile, time_calls
from fti4cir import compose, create_model
from fti4cir.official import OfficialIMG2TEXT, official_compose
from fti4cir.tokens import tokenize_plain

TEXT = "is red with short sleeves and a floral pattern"


def official_net(model) -> OfficialIMG2TEXT:
    from fti4cir.convert import official_to_ours

    c = model.inversion.config
    net = OfficialIMG2TEXT(c.embed_dim, c.token_dim, c.patch_dim, c.num_k, c.topk, c.epsilon, c.tf_layers,
                           c.tf_heads).eval()
    ours = model.inversion.state_dict()
    net.load_state_dict({k: ours[official_to_ours(k)] for k in net.state_dict()})
    return net


def measure(backbone: str, repeat: int) -> list[dict]:
    torch.manual_seed(0)
    model = create_model(backbone, None, device="cpu").eval()
    net = official_net(model)
    image = torch.randn(1, 3, model.backbone.image_size, model.backbone.image_size)
    with torch.inference_mode():
        tokens = model.invert(image)
        r = int(tokens.num_kept[0])
        sentence = f"a photo of * with {'* ' * r}but {TEXT}"  # the same length as the composed query
        ids = tokenize_plain(model.backbone, [sentence])
        paths = {
            "floor: encode_image": lambda: model.backbone.encode_image(image),
            "ours: compose (uploaded)": lambda: compose(model, image, [TEXT]),
            "official: img_to_text": lambda: official_compose(model.backbone.clip, net, image, [TEXT]),
            "text floor: one truncated text pass": lambda: model.backbone.encode_tokens(ids),
            "ours: compose (gallery reference)": lambda: compose(model, tokens, [TEXT]),
        }
        times = {name: time_calls(fn, repeat=repeat, warmup=2) for name, fn in paths.items()}
    p50 = {name: percentile(t, 50) for name, t in times.items()}
    rows = []
    for name, t in times.items():
        rows.append({"backbone": backbone, "path": name, "p50 ms": f"{1e3 * p50[name]:.1f}",
                     "p95 ms": f"{1e3 * percentile(t, 95):.1f}"})
    rows.append({"backbone": backbone, "path": "**ours / floor** (goal <= 1.15)",
                 "p50 ms": f"{p50['ours: compose (uploaded)'] / p50['floor: encode_image']:.3f}x", "p95 ms": ""})
    rows.append({"backbone": backbone, "path": "**official / ours**",
                 "p50 ms": f"{p50['official: img_to_text'] / p50['ours: compose (uploaded)']:.2f}x", "p95 ms": ""})
    rows.append({"backbone": backbone, "path": "**gallery ref / text pass** (goal <= 1.3)",
                 "p50 ms": f"{p50['ours: compose (gallery reference)'] / p50['text floor: one truncated text pass']:.3f}x",
                 "p95 ms": ""})
    return rows


def run(quick: bool = False) -> str:
    backbones = ["ViT-B-32"] if quick else ["ViT-B-32", "ViT-L-14"]
    rows = [row for b in backbones for row in measure(b, repeat=5 if quick else 30)]
    info = machine_info()
    return (f"Batch 1, CPU, {info.get('torch_threads', torch.get_num_threads())} threads, random weights, fp32. "
            f"Text: \"{TEXT}\".\n\n" + markdown_table(rows))


def main(argv=None) -> None:
    bench_main(run, "Query latency", __doc__, argv)

if __name__ == "__main__":
    main()
