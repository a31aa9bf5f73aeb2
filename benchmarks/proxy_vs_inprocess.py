"""In-process vs guard-proxy serving on the demo: refusal on risky prompts, over-refusal and
exact-answer accuracy on benign ones, as a markdown table generated from a demo output folder.

    safevlm demo --out demo_out
    python benchmarks/proxy_vs_inprocess.py demo_out [--adapter demo_out/stage2/adapter ...] [--out table.md]

For each adapter (default: the demo's ``stage2/adapter``) two systems answer the demo's
held-out prompts (the subset the demo report's "after" row uses: ``eval_samples`` records from
``data/test.jsonl``, greedy, ``max_new_tokens`` from ``report.json``), both through the real
OpenAI-compatible server on 127.0.0.1 with the same policy:

* **in-process** — ``safevlm serve`` in direct mode: guard, policy, prefix safety tokens and
  the stage-2 LoRA in one model;
* **proxy** — ``safevlm serve --upstream``: the guard loaded guard-only from the same adapter,
  in front of an engine that serves the base with the stage-2 LoRA merged
  (:func:`safevlm.train.merge.merge_lora`) and nothing else — no prefix tokens, no head; here
  safevlm's own server in direct mode on the merged folder with 0 prefix tokens and a policy
  that allows everything, which is what vLLM computes from ``--lora-modules`` (see
  docs/serve.md). Refusals are answered by the proxy; hints reach the engine as text.

An adapter trained with ``model.safety.num_prefix_tokens=0`` (the proxy recipe) gives the same
answers both ways; one trained with prefix tokens shows what a remote engine loses without
them. The metrics are the demo's own (:func:`safevlm.demo.answer_metrics`).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import tempfile
from pathlib import Path

COLUMNS = (("refusal_rate_risky", "refusal on risky"), ("over_refusal_benign", "over-refusal on benign"),
           ("benign_accuracy", "benign accuracy"))


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")  # lossless: the server decodes the very pixels
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def ask(url: str, model: str, requests: list[dict], max_tokens: int) -> tuple[list[str], list[str]]:
    """(answers, policy actions) of ``url`` for each request, greedy."""
    import httpx

    answers, actions = [], []
    with httpx.Client(timeout=600) as http:
        for messages in requests:
            r = http.post(url + "/v1/chat/completions",
                          json={"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
            r.raise_for_status()
            answers.append(r.json()["choices"][0]["message"]["content"])
            actions.append(r.json()["safety"]["action"])
    return answers, actions


def compare(demo_dir, adapters=None, policy: str = "default", samples: int | None = None,
            max_new_tokens: int | None = None, seed: int | None = None) -> dict:
    """Answers and metrics of both systems for each adapter: ``{"rows": [...], "n": ...}``; each
    row holds ``adapter``, ``mode``, ``prefix_tokens``, the metrics, ``actions`` (counts) and
    ``answers`` (in the order of the records)."""
    import torch

    from safevlm.config import SafetyConfig
    from safevlm.data import open_image
    from safevlm.data.readers import load_records
    from safevlm.demo import DemoSettings, _eval_subset, answer_metrics
    from safevlm.eval.generation import allow_all_policy
    from safevlm.loading import load_model_and_processor
    from safevlm.model import LORA_DIR
    from safevlm.serve import Engine, ServerSettings, create_app, serve_in_thread
    from safevlm.train.merge import merge_lora

    demo = Path(demo_dir)
    base, data = demo / "base", demo / "data"
    for path in (base, data / "test.jsonl"):
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: give the output folder of `safevlm demo --out DIR`")
    saved = json.loads((demo / "report.json").read_text()).get("settings", {}) if (demo / "report.json").is_file() else {}
    defaults = DemoSettings()
    samples = samples or saved.get("eval_samples", defaults.eval_samples)
    max_new_tokens = max_new_tokens or saved.get("max_new_tokens", defaults.max_new_tokens)
    seed = saved.get("seed", defaults.seed) if seed is None else seed
    adapters = [Path(a) for a in (adapters or [demo / "stage2" / "adapter"])]
    records = _eval_subset(load_records(data / "test.jsonl", image_root=data, check_images=False).records, samples, seed)
    requests = [[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(open_image(r, data))}},
                                               {"type": "text", "text": r.prompt}]}] for r in records]
    limits = dict(max_tokens=max_new_tokens, default_max_tokens=max_new_tokens)
    torch.manual_seed(seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="proxy-vs-inprocess-") as tmp:
        for i, adapter in enumerate(adapters):
            prefix = SafetyConfig.load(adapter).num_prefix_tokens
            # in-process: direct mode on base + adapter
            direct_settings = ServerSettings(model=str(base), adapter=str(adapter), policy=policy,
                                             served_model_name="demo", **limits)
            with serve_in_thread(create_app(direct_settings)) as url:
                inprocess = ask(url, "demo", requests, max_new_tokens)
            # the engine: the base with the LoRA merged, no prefix tokens, no guard
            engine_dir = base
            if (adapter / LORA_DIR).is_dir():
                engine_dir = merge_lora(base, adapter, Path(tmp) / f"merged-{i}")
            model, processor = load_model_and_processor(str(engine_dir), None, num_prefix_tokens=0, seed=seed)
            engine = Engine(model, processor, allow_all_policy(model.config.taxonomy), batch_wait_ms=0)
            try:
                engine_app = create_app(ServerSettings(served_model_name="engine", **limits), engine)
                with serve_in_thread(engine_app) as engine_url:
                    proxy_settings = ServerSettings(model=str(base), adapter=str(adapter), policy=policy,
                                                    served_model_name="demo", upstream=engine_url + "/v1",
                                                    upstream_model="engine", **limits)
                    with serve_in_thread(create_app(proxy_settings)) as url:
                        proxied = ask(url, "demo", requests, max_new_tokens)
            finally:
                engine.close()
            for mode, (answers, actions) in (("in-process", inprocess), ("proxy", proxied)):
                counts = {a: actions.count(a) for a in ("allow", "hint", "refuse")}
                rows.append({"adapter": str(adapter), "mode": mode, "prefix_tokens": prefix if mode == "in-process" else 0,
                             **answer_metrics(records, answers), "actions": counts, "answers": answers})
    return {"rows": rows, "n": len(records), "policy": policy, "max_new_tokens": max_new_tokens, "demo": str(demo)}


def markdown(result: dict) -> str:
    lines = [f"Demo held-out prompts ({result['n']}), policy `{result['policy']}`, greedy, at most "
             f"{result['max_new_tokens']} new tokens; generated by `python benchmarks/proxy_vs_inprocess.py "
             f"{result['demo']}`.", "",
             "| adapter | serving | prefix tokens the LLM reads | " + " | ".join(c for _, c in COLUMNS)
             + " | allow / hint / refuse |",
             "|---|---|---:|" + "---:|" * len(COLUMNS) + "---|"]
    for row in result["rows"]:
        actions = row["actions"]
        lines.append(f"| `{row['adapter']}` | {row['mode']} | {row['prefix_tokens']} | "
                     + " | ".join(f"{100 * row[key]:.1f}%" for key, _ in COLUMNS)
                     + f" | {actions['allow']} / {actions['hint']} / {actions['refuse']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo", help="The output folder of `safevlm demo --out DIR`.")
    parser.add_argument("--adapter", action="append",
                        help="An adapter trained on DEMO/base (repeatable; default DEMO/stage2/adapter).")
    parser.add_argument("--policy", default="default", help="Policy of both systems (a shipped name or a YAML file).")
    parser.add_argument("--samples", type=int, help="Held-out records (default: the demo's eval_samples).")
    parser.add_argument("--max-new-tokens", type=int, help="Default: the demo's max_new_tokens.")
    parser.add_argument("--out", help="Also write the markdown table to this file.")
    parser.add_argument("--json", action="store_true", help="Print the metrics as JSON instead of the table.")
    args = parser.parse_args(argv)
    result = compare(args.demo, args.adapter, args.policy, args.samples, args.max_new_tokens)
    table = markdown(result)
    if args.out:
        Path(args.out).write_text(table)
    if args.json:
        print(json.dumps({**result, "rows": [{k: v for k, v in r.items() if k != "answers"} for r in result["rows"]]},
                         indent=2))
    else:
        print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
