"""`safevlm serve`: the OpenAI-compatible server with the safety guard."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server (chat completions, safety classify) with the safety guard.",
        description="Serve a LLaVA folder (+ safety adapter) over HTTP: POST /v1/chat/completions (OpenAI "
        "format, data: base64 images), POST /v1/safety/classify, GET /v1/models, /health, /metrics. "
        "Every flag can also be set by the environment variable shown in its help.",
    )
    try:
        from safevlm.serve.settings import add_settings_arguments
    except ImportError:  # the serve extra is not installed: keep the CLI working, fail on use
        parser.set_defaults(func=_missing_extra)
        return
    add_settings_arguments(parser)
    parser.set_defaults(func=command)


def _missing_extra(args) -> int:
    from safevlm.errors import UsageError

    raise UsageError("the server needs the serve extra: pip install 'safevlm[serve]'")


def command(args) -> int:
    from pydantic import ValidationError

    from safevlm.errors import UsageError
    from safevlm.serve.settings import settings_from_args

    try:
        settings = settings_from_args(args)
    except ValidationError as err:
        raise UsageError(str(err)) from None
    from safevlm.serve.app import run_server

    run_server(settings)
    return 0
