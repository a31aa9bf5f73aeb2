"""`safevlm chat`: guarded generation — one answer, or an interactive conversation."""

from __future__ import annotations

import json
import sys

from safevlm.commands.classify import (
    add_model_arguments,
    load_image,
    overrides_from_args,
)
from safevlm.errors import UsageError

INTERACTIVE_HELP = "commands: /image PATH (new conversation about another image), /reset, /quit"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="Answer with the safety head and policy in the loop (allow / hint / refuse).",
        description="Guarded generation: the safety head classifies the image and prompt, the policy "
        "allows, inserts a safety hint, or refuses without running the LLM. Without --prompt, reads "
        "prompts from standard input (an interactive, multi-turn conversation; " + INTERACTIVE_HELP + ").",
    )
    add_model_arguments(parser)
    parser.add_argument("--image", default=None, metavar="PATH", help="Image file (optional: text-only without).")
    parser.add_argument("--prompt", default=None, help="The question; omit for interactive mode.")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="Most new tokens per answer.")
    parser.add_argument("--temperature", type=float, default=0.0, help="Sampling temperature (0: greedy).")
    parser.add_argument("--json", action="store_true", help="Print each result as one JSON object.")
    parser.set_defaults(func=command)


def _generation_kwargs(args) -> dict:
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    if args.temperature > 0:
        return {"max_new_tokens": args.max_new_tokens, "do_sample": True, "temperature": args.temperature}
    return {"max_new_tokens": args.max_new_tokens, "do_sample": False}


def _show(result, as_json: bool, out, context: dict | None = None) -> None:
    """Print one answer; with ``as_json`` one JSON object led by ``context`` (image, prompt,
    policy: the same keys as `safevlm classify --json`)."""
    if as_json:
        print(json.dumps({**(context or {}), **result.to_dict()}), file=out, flush=True)
        return
    tag = f"[{result.action}"
    if result.decided_by:
        tag += f": {result.decided_by}"
    tag += f" | level {result.risk_level}, type {result.risk_type}]"
    print(tag, file=out)
    if result.hint:
        print(f"[hint: {result.hint}]", file=out)
    if result.error:
        print(f"[head error: {result.error}]", file=out)
    print(result.text, file=out, flush=True)


def command(args) -> int:
    from safevlm.guarded import ChatSession
    from safevlm.loading import load_model_and_processor
    from safevlm.policy import load_policy

    policy = load_policy(args.policy)
    overrides = overrides_from_args(args)
    policy.check_overrides(overrides)
    generation = _generation_kwargs(args)
    image = load_image(args.image) if args.image else None
    model, processor = load_model_and_processor(args.model, args.adapter, device=args.device, dtype=args.dtype,
                                                allow_base_mismatch=args.allow_base_mismatch)
    session = ChatSession(model, processor, policy, image=image, overrides=overrides, **generation)
    if args.prompt is not None:
        _show(session.ask(args.prompt), args.json, sys.stdout,
              {"image": args.image, "prompt": args.prompt, "policy": policy.name})
        return 0
    return interactive(session, sys.stdin, sys.stdout, as_json=args.json, image_path=args.image)


def interactive(session, stdin, stdout, as_json: bool = False, image_path: str | None = None) -> int:
    """Read prompts line by line until /quit or end of input. A bad ``/image`` file is
    reported and the conversation goes on with its current image."""
    from safevlm.data.images import ImageError
    from safevlm.guarded import InputTooLong

    tty = stdin.isatty()
    if tty:
        print(f"safevlm chat (policy {session.policy.name}); {INTERACTIVE_HELP}", file=stdout)
    while True:
        if tty:
            print("> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            session.reset()
            print("[conversation reset]", file=stdout, flush=True)
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            try:
                session.set_image(load_image(path) if path else None)
            except ImageError as err:
                print(f"[error: {err}]", file=stdout, flush=True)
                continue
            image_path = path or None
            print(f"[new conversation about {path or 'no image'}]", file=stdout, flush=True)
            continue
        if line.startswith("/"):
            print(f"[unknown command {line.split()[0]}; {INTERACTIVE_HELP}]", file=stdout, flush=True)
            continue
        try:
            result = session.ask(line)
        except InputTooLong as err:  # the conversation outgrew the context: say so, keep the session
            print(f"[error: {err}; /reset starts a new conversation]", file=stdout, flush=True)
            continue
        _show(result, as_json, stdout, {"image": image_path, "prompt": line, "policy": session.policy.name})
