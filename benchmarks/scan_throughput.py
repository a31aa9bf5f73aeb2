"""Dataset-scan throughput: `safevlm scan` images/s over vision-tower-only images/s.

    python benchmarks/scan_throughput.py --json
    python benchmarks/scan_throughput.py --json --llava-widths --batch-size 64 --num-workers 8   # on a GPU

Both sides read the same JPEG files (COCO-sized, 640 x 480) with the same batch size and the
same DataLoader workers, and both include decoding, preprocessing and writing:

* ``vision``: the scan's own loader (read, sha256, decode, CLIP preprocessing in workers),
  the vision tower (``SafeVLM.encode_images``), one JSON line per image appended per batch;
* ``scan_mlp`` / ``scan_cabstractor``: :func:`safevlm.scan.run_scan` (vision tower + safety
  projector + head + policy, duplicates, rows appended per batch, summary.json; no report) with
  the ``mlp`` projector and with ``cabstractor`` (64 safety features).

A ratio is the median over rounds of ``vision time / scan time`` in the same round (paired;
every case runs once per round, in a shuffled order). Targets: >= 0.85 (mlp), >= 0.80
(cabstractor).

The model is LLaVA-1.5-shaped: a CLIP ViT with 24 layers over 336-px images in 14-px patches
(576 patch features, feature layer -2), a safety head with 64 queries, 2 layers, 8 heads. By
default widths are LLaVA-1.5-7B's divided by 8 so that it runs on a CPU (vision 128, head 128,
text 512); ``--llava-widths`` uses the real ones (vision 1024, text 4096, head 1024). The
language model has 1 layer: guard mode never runs it (its token embeddings are read only when
a prompt is given). Weights are random: speed does not depend on them. On CUDA the weights are
bfloat16 (``dtype="auto"``), on CPU float32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {"scan_over_vision_mlp": 0.85, "scan_over_vision_cabstractor": 0.80}


def build(args, device):
    """(processor, {"mlp": SafeVLM, "cabstractor": SafeVLM}) sharing one LLaVA-1.5-shaped base."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from safevlm.loading import resolve_dtype
    from safevlm.model import SafeVLM
    from safevlm.tiny import IMAGE_TOKEN, TinyPreset, build_processor, build_tokenizer

    widths = (1024, 4096, 1024) if args.llava_widths else (args.vision_hidden, args.text_hidden, args.head_hidden)
    vision_hidden, text_hidden, head_hidden = widths
    tokenizer = build_tokenizer(2048)
    preset = TinyPreset(image_size=args.image_size, patch_size=args.patch_size, vision_hidden=vision_hidden,
                        vision_layers=args.vision_layers, vision_heads=max(vision_hidden // 64, 1),
                        text_hidden=text_hidden, text_layers=1, text_heads=max(text_hidden // 128, 1),
                        text_intermediate=int(text_hidden * 2.6875), vocab_size=2048, max_position_embeddings=2048)
    processor = build_processor(preset, tokenizer)
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
                              num_hidden_layers=args.vision_layers, num_attention_heads=preset.vision_heads,
                              image_size=args.image_size, patch_size=args.patch_size, projection_dim=vision_hidden)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=preset.text_intermediate,
                       num_hidden_layers=1, num_attention_heads=preset.text_heads, num_key_value_heads=preset.text_heads,
                       max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), projector_hidden_act="gelu",
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=(args.image_size // args.patch_size) ** 2)
    torch.manual_seed(args.seed)
    dtype = resolve_dtype("auto", device)
    base = LlavaForConditionalGeneration(config).to(device=device, dtype=dtype).eval()
    safety = dict(head_hidden_size=head_hidden, num_query_tokens=64, head_num_heads=8, head_num_layers=2,
                  num_prefix_tokens=0)
    models = {"mlp": SafeVLM(base, **safety), "cabstractor": SafeVLM(base, projector_kind="cabstractor",
                                                                       num_safety_features=64, **safety)}
    for model in models.values():
        for name in model.SAFETY_MODULES:
            getattr(model, name).to(device=device, dtype=dtype)
        model.eval()
    return processor, models


def write_images(folder: Path, n: int, seed: int) -> None:
    """``n`` JPEG photos, 640 x 480 (COCO's usual size), crops of scikit-image's photographs."""
    from PIL import Image
    from skimage import data

    sources = [Image.fromarray(getattr(data, name)()).convert("RGB")
               for name in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")]
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        source = sources[i % len(sources)]
        scale = rng.uniform(1.3, 2.0)
        big = source.resize((int(640 * scale), int(640 * scale * source.height / source.width) + 480))
        left, top = rng.randrange(big.width - 640 + 1), rng.randrange(big.height - 480 + 1)
        big.crop((left, top, left + 640, top + 480)).save(folder / f"{i:06d}.jpg", quality=90)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="Print only the JSON result.")
    parser.add_argument("--images", type=int, default=96, help="Images scanned per case and round.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default: min(8, CPUs - 1)).")
    parser.add_argument("--repeats", type=int, default=5, help="Timed rounds (medians are reported).")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed rounds first.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the main process (CPU).")
    parser.add_argument("--device", default=None, help="cpu, cuda (default: cuda if available).")
    parser.add_argument("--prompt", default=None, help="A prompt sent with every image (default: the image alone).")
    parser.add_argument("--llava-widths", action="store_true", help="LLaVA-1.5-7B widths (for a GPU).")
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument("--vision-hidden", type=int, default=128)
    parser.add_argument("--vision-layers", type=int, default=24)
    parser.add_argument("--text-hidden", type=int, default=512)
    parser.add_argument("--head-hidden", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    from safevlm.devices import resolve_device
    from safevlm.scan.outputs import AppendFile
    from safevlm.scan.pipeline import ItemBatches, ScanOptions, make_loader, run_scan
    from safevlm.scan.sources import enumerate_inputs

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(resolve_device(args.device))
    workers = args.num_workers if args.num_workers is not None else max(0, min(8, (os.cpu_count() or 1) - 1))
    processor, models = build(args, device)
    work = Path(tempfile.mkdtemp(prefix="scan_throughput_"))
    try:
        folder = work / "images"
        write_images(folder, args.images, args.seed)
        items = [it for li in enumerate_inputs([str(folder)]) for it in li.items]
        batches = [items[i:i + args.batch_size] for i in range(0, len(items), args.batch_size)]
        n_features = models["mlp"].backbone.fixed_image_tokens
        runs = {"n": 0}

        def vision_only():
            runs["n"] += 1
            out = AppendFile(work / f"vision_{runs['n']}.jsonl")
            loader = make_loader(ItemBatches(batches, processor, n_features, args.prompt), min(workers, len(batches)),
                                 pin_memory=device.type == "cuda")
            try:
                with torch.inference_mode():
                    for batch, payload in zip(batches, loader):
                        tensors = payload["image_inputs"].tensors
                        features = models["mlp"].encode_images(
                            **{k: v.to(device, non_blocking=True) for k, v in tensors.items()})
                        norms = features.float().norm(dim=-1).mean(dim=-1).cpu().tolist()  # a result per image
                        out.append([{"id": it.id, "sha256": p.sha256, "width": p.width, "height": p.height,
                                     "feature_norm": v} for it, p, v in zip(batch, payload["prepared"], norms)])
            finally:
                out.close()

        def scan_with(kind):
            def run():
                runs["n"] += 1
                options = ScanOptions(inputs=[str(folder)], out=str(work / f"scan_{runs['n']}"), model="benchmark",
                                      prompt=args.prompt, batch_size=args.batch_size, num_workers=workers,
                                      report=False, progress=False)
                result = run_scan(options, model=models[kind], processor=processor)
                if result.summary["scanned"] != len(items):
                    raise RuntimeError(f"scanned {result.summary['scanned']} of {len(items)} images")
            return run

        cases = {"vision": vision_only, "scan_mlp": scan_with("mlp"), "scan_cabstractor": scan_with("cabstractor")}
        times = {name: [] for name in cases}
        order = list(cases)
        shuffle = random.Random(args.seed).shuffle
        for round_ in range(args.warmup + args.repeats):
            shuffle(order)
            for name in order:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                cases[name]()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if round_ >= args.warmup:
                    times[name].append(time.perf_counter() - start)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def paired(name: str) -> float:
        return round(statistics.median(v / s for v, s in zip(times["vision"], times[name])), 4)

    rates = {name: round(len(items) / statistics.median(t), 2) for name, t in times.items()}
    result = {
        "scan_over_vision_mlp": paired("scan_mlp"),
        "scan_over_vision_cabstractor": paired("scan_cabstractor"),
        "images_per_second": rates,
        "config": {
            "device": str(device),
            "dtype": str(next(models["mlp"].parameters()).dtype).replace("torch.", ""),
            "vision": f"CLIP ViT {args.vision_layers} layers x {1024 if args.llava_widths else args.vision_hidden}, "
                      f"{args.image_size}px / {args.patch_size}px patches ({n_features} features)",
            "safety": f"head {models['mlp'].config.head_hidden_size} wide, 64 queries, 2 layers, 8 heads; "
                      "cabstractor: 64 safety features",
            "images": len(items), "image_size": "640x480 JPEG", "batch_size": args.batch_size,
            "num_workers": workers, "prompt": args.prompt, "repeats": args.repeats, "warmup": args.warmup,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        },
    }
    result["targets_met"] = {key: result[key] >= bound for key, bound in TARGETS.items()}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, bound in TARGETS.items():
            print(f"{key:30s} {result[key]:.3f}  (target >= {bound}: {'met' if result['targets_met'][key] else 'MISSED'})")
        print("images/s:", rates)
        print("config:", json.dumps(result["config"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
