"""The main job on the embedded default: build the tiny LLaVA, wrap it with safety modules,
and run guard and generation on a real photograph (skimage's astronaut)."""

from __future__ import annotations

import json
from pathlib import Path


def run_demo(out_dir: str | Path, seed: int = 0) -> dict:
    import torch
    from skimage import data as skdata
    from PIL import Image

    from safevlm.model import SafeVLM
    from safevlm.tiny import build_tiny

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base, processor = build_tiny("default", seed=seed)
    torch.manual_seed(seed)
    model = SafeVLM(base).eval()
    image = Image.fromarray(skdata.astronaut())
    prompt = "What is shown in the image?"
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}], add_generation_prompt=True
    )
    inputs = processor(images=image, text=text, return_tensors="pt")
    guard = model.guard(**inputs)
    tokens = model.generate(**inputs, vision_features=guard.vision_features, max_new_tokens=12, do_sample=False)
    taxonomy = model.config.taxonomy
    result = {
        "image": "skimage.data.astronaut",
        "prompt": prompt,
        "risk_level": int(guard.risk_level[0]),
        "risk_type": taxonomy.type_name(int(guard.risk_type[0])),
        "level_probs": [round(float(p), 4) for p in guard.level_probs[0]],
        "type_probs": dict(zip(taxonomy.type_names, (round(float(p), 4) for p in guard.type_probs[0]))),
        "generated": processor.batch_decode(tokens, skip_special_tokens=True)[0],
        "counts": model.count_parameters(),
        "note": "untrained safety modules on an untrained tiny base: numbers are random until training",
    }
    (out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
