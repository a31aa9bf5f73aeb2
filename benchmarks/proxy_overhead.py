"""Overhead of the guard proxy: a chat request through `safevlm serve --upstream` over the same
request sent to the upstream engine directly, and the guard-only process's memory.

    python benchmarks/proxy_overhead.py --json

The model is benchmarks/guard_overhead.py's LLaVA-1.5-shaped one (its ``build`` and flags:
576 image tokens from 336-px images, CLIP 24 x 128, Llama 8 x 512, random weights), saved to a
temporary folder with a 0-prefix-token safety adapter (the proxy recipe). Three processes on
127.0.0.1, each with ``--threads`` torch threads:

* **upstream** — stands in for the inference engine: safevlm's server in direct mode on the
  full model, its guard replaced by a constant "safe" answer (an engine runs no safety head:
  the vision pass and the generation only), forced to ``--new-tokens`` new tokens
  (``min_new_tokens``, as ``ignore_eos`` would in vLLM);
* **proxy** — ``create_app`` with ``upstream`` set: the guard loaded guard-only from the
  folder (no language-model weights), a policy that allows everything (the whole guard still
  runs: vision tower, safety projector, head, policy), forwarding to the upstream;
* this process, the client: each round sends the same request (the image as a data URL, a
  ~40-token prompt, greedy, ``max_tokens`` = ``--new-tokens``) to the upstream and through
  the proxy, in a shuffled order; ``proxy_over_direct`` is the median over rounds of the two
  latencies' ratio in the same round (paired, as in guard_overhead.py). Target <= 1.10.

Memory: two more processes each load the folder with
:func:`safevlm.loading.load_model_and_processor` — full, and ``guard_only=True`` — run what
they serve once (a guarded generation of 2 tokens; a guard call), so that every weight they
hold has been read, and report their resident set size (``VmRSS`` from ``/proc/self/status``;
``anon_file_mib``: its anonymous and file-mapped parts) and that size less the process's RSS
before loading (``model_mib``: torch and the libraries excluded).
``guard_rss_over_full`` is the ratio of the two RSS, ``guard_model_over_full`` that of the
model parts. The benchmark model's LLM is much smaller relative to its vision tower than
LLaVA-1.5-7B's (8 x 512 vs 32 x 4096), so its guard share is far larger than the 7B model's
(``safevlm params --guard-only`` gives that one).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from guard_overhead import PROMPT, build, model_arguments, print_result  # noqa: E402 (the same model and report)

TARGETS = {"proxy_over_direct": ("<=", 1.10)}
SERVED = "bench"


# -- the roles run in their own processes ---------------------------------------------------------------------
def _rss_mib(field: str = "VmRSS") -> float:
    """A memory figure of this process from ``/proc/self/status``, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _allow_all_policy():
    from safevlm.policy import Policy

    return Policy.from_dict({"name": "allow_all", "rules": {"default": {"hint_threshold": None, "refuse_threshold": None}},
                             "hints": {"default": {"low": "-", "medium": "-", "high": "-"}},
                             "refusals": {"default": "-"}})


def _safe_guard(model):
    """A constant 'safe' head answer in the guard's output shape (the engine runs no head)."""
    import torch

    from safevlm.model import GuardOutput

    tax = model.config.taxonomy
    level = torch.zeros(tax.num_levels)
    level[0] = 1.0
    types = torch.zeros(tax.num_types)
    types[tax.safe_type_id] = 1.0

    def guard(input_ids=None, pixel_values=None, attention_mask=None, vision_features=None, prompt_mask=None):
        rows = (input_ids if input_ids is not None else vision_features).shape[0]
        lp, tp = level.expand(rows, -1), types.expand(rows, -1)
        return GuardOutput(level_logits=lp.log(), type_logits=tp.log(), level_probs=lp, type_probs=tp,
                           risk_level=lp.argmax(-1), risk_type=tp.argmax(-1), vision_features=vision_features,
                           safety_state=None)

    return guard


def serve_role(args) -> int:
    import torch
    import uvicorn

    from safevlm.serve import Engine, ServerSettings, create_app

    torch.set_num_threads(args.threads)
    common = dict(served_model_name=SERVED, max_tokens=max(args.new_tokens, 1), default_max_tokens=args.new_tokens,
                  log_level="warning")
    if args.role == "upstream":
        from safevlm.loading import load_model_and_processor

        model, processor = load_model_and_processor(args.folder, args.adapter, device="cpu")
        model.guard = _safe_guard(model)
        model.base_model.generation_config.min_new_tokens = args.new_tokens  # forced, as the engine's ignore_eos
        app = create_app(ServerSettings(**common), Engine(model, processor, _allow_all_policy(), batch_wait_ms=0))
    else:
        settings = ServerSettings(model=args.folder, adapter=args.adapter, upstream=args.upstream_url,
                                  upstream_model=SERVED, device="cpu", batch_wait_ms=0, **common)
        engine = Engine.from_settings(settings)  # guard-only: the proxy's real loading path
        engine.policy = _allow_all_policy()
        app = create_app(settings, engine)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    return 0


def rss_role(args) -> int:
    import torch
    import transformers.models.clip.modeling_clip  # noqa: F401 (the code both modes run, imported
    import transformers.models.llama.modeling_llama  # noqa: F401  before the baseline is read)
    import transformers.models.llava.modeling_llava  # noqa: F401
    from PIL import Image

    from safevlm.guarded import classify, generate_guarded
    from safevlm.loading import load_model_and_processor

    torch.set_num_threads(args.threads)
    baseline = _rss_mib()
    guard_only = args.role == "rss-guard"
    model, processor = load_model_and_processor(args.folder, args.adapter, device="cpu", guard_only=guard_only)
    image = Image.new("RGB", (args.image_size, args.image_size), (120, 30, 200))
    # what each process serves, so every weight it holds has been read (mapped files count once touched)
    if guard_only:
        classify(model, processor, [image], [PROMPT], _allow_all_policy())
    else:
        generate_guarded(model, processor, [image], [PROMPT], _allow_all_policy(), max_new_tokens=2)
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"rss_mib": round(_rss_mib(), 1), "baseline_mib": round(baseline, 1), "params": params,
                      "anon_mib": round(_rss_mib("RssAnon"), 1), "file_mib": round(_rss_mib("RssFile"), 1)}))
    return 0


# -- the orchestrator -------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url}: no /health within {timeout} s")


def _save(args, folder: Path) -> tuple[Path, Path]:
    """The benchmark model as a base folder and a 0-prefix-token safety adapter."""
    from safevlm.compat import quiet_loading

    base, processor, _, without_prefix = build(args)
    base_dir, adapter_dir = folder / "llava-bench", folder / "adapter"
    with quiet_loading():
        base.save_pretrained(base_dir, safe_serialization=True)
    processor.save_pretrained(base_dir)
    without_prefix.save_pretrained(adapter_dir)
    return base_dir, adapter_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="Print only the JSON result.")
    parser.add_argument("--repeats", type=int, default=15, help="Timed rounds (medians are reported).")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed rounds first.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process.")
    parser.add_argument("--new-tokens", type=int, default=32, help="New tokens per answer (forced upstream).")
    model_arguments(parser)
    # internal: the processes the benchmark starts
    parser.add_argument("--role", choices=["upstream", "proxy", "rss-full", "rss-guard"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream-url", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role in ("upstream", "proxy"):
        return serve_role(args)
    if args.role in ("rss-full", "rss-guard"):
        return rss_role(args)

    import httpx
    import numpy as np
    import torch
    from PIL import Image

    me = [sys.executable, str(Path(__file__).resolve())]
    shared = ["--threads", str(args.threads), "--new-tokens", str(args.new_tokens), "--image-size", str(args.image_size)]
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="proxy-bench-") as tmp:
        folder, adapter = _save(args, Path(tmp))
        paths = ["--folder", str(folder), "--adapter", str(adapter)]

        # memory: one process per loading mode, one at a time
        rss = {}
        for role in ("rss-full", "rss-guard"):
            out = subprocess.run(me + ["--role", role, *paths, *shared], capture_output=True, text=True, check=True)
            rss[role] = json.loads(out.stdout.strip().splitlines()[-1])

        up_port, proxy_port = _free_port(), _free_port()
        upstream, proxy = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{proxy_port}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        try:
            procs.append(subprocess.Popen(me + ["--role", "upstream", "--port", str(up_port), *paths, *shared],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env))
            _wait(upstream, procs[-1])
            procs.append(subprocess.Popen(me + ["--role", "proxy", "--port", str(proxy_port), "--upstream-url",
                                                upstream + "/v1", *paths, *shared],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env))
            _wait(proxy, procs[-1])

            rng = np.random.default_rng(args.seed)
            image = Image.fromarray((rng.random((args.image_size, args.image_size, 3)) * 255).astype("uint8"))
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            body = {"model": SERVED, "max_tokens": args.new_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                              {"type": "text", "text": PROMPT}]}]}
            classify_body = {"model": SERVED, "image": url, "prompt": PROMPT}
            cases = {"direct": (upstream, "/v1/chat/completions", body),
                     "proxy": (proxy, "/v1/chat/completions", body),
                     "guard": (proxy, "/v1/safety/classify", classify_body)}
            times = {name: [] for name in cases}
            answers = {}
            order = list(cases)
            shuffle = random.Random(args.seed).shuffle
            with httpx.Client(timeout=600) as http:
                for round_ in range(args.warmup + args.repeats):
                    shuffle(order)
                    for name in order:
                        server, path, payload = cases[name]
                        start = time.perf_counter()
                        response = http.post(server + path, json=payload)
                        elapsed = time.perf_counter() - start
                        response.raise_for_status()
                        if round_ >= args.warmup:
                            times[name].append(elapsed)
                        if name != "guard":
                            answers[name] = response.json()
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()

    for name in ("direct", "proxy"):
        tokens = answers[name]["usage"]["completion_tokens"]
        if tokens != args.new_tokens:
            raise RuntimeError(f"{name}: expected {args.new_tokens} new tokens, got {tokens}")
    if answers["proxy"]["choices"][0]["message"]["content"] != answers["direct"]["choices"][0]["message"]["content"]:
        raise RuntimeError("the proxied answer differs from the direct one")
    if answers["proxy"]["safety"]["action"] != "allow":
        raise RuntimeError(f"expected an allowed request, got {answers['proxy']['safety']['action']}")

    def paired(numerator: str, denominator: str) -> float:
        return round(statistics.median(a / b for a, b in zip(times[numerator], times[denominator])), 4)

    full, guard = rss["rss-full"], rss["rss-guard"]
    result = {
        "proxy_over_direct": paired("proxy", "direct"),
        "median_ms": {name: round(1000 * statistics.median(t), 1) for name, t in times.items()},
        "memory": {
            "full_rss_mib": full["rss_mib"], "guard_rss_mib": guard["rss_mib"],
            "guard_rss_over_full": round(guard["rss_mib"] / full["rss_mib"], 4),
            "full_model_mib": round(full["rss_mib"] - full["baseline_mib"], 1),
            "guard_model_mib": round(guard["rss_mib"] - guard["baseline_mib"], 1),
            "guard_model_over_full": round((guard["rss_mib"] - guard["baseline_mib"])
                                           / (full["rss_mib"] - full["baseline_mib"]), 4),
            "full_params": full["params"], "guard_params": guard["params"],
            "anon_file_mib": {"full": [full["anon_mib"], full["file_mib"]], "guard": [guard["anon_mib"], guard["file_mib"]]},
        },
        "config": {
            "new_tokens": args.new_tokens,
            "prompt_tokens": answers["direct"]["usage"]["prompt_tokens"],
            "image_size": args.image_size,
            "vision": f"CLIP ViT {args.vision_layers} layers x {args.vision_hidden}",
            "llm": f"Llama {args.text_layers} layers x {args.text_hidden}",
            "head_hidden": args.head_hidden,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "threads_per_process": args.threads,
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
        },
    }
    print_result(result, TARGETS, args.json, ("memory", "config"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
