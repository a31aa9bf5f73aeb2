"""`ServerSettings`: every server option in one pydantic model.

Each field is read from the environment (``SAFEVLM_<FIELD>``, e.g. ``SAFEVLM_API_KEY``) and
is also a ``safevlm serve`` flag (``--api-key``): :func:`add_settings_arguments` builds the
flags from the fields, so the two can never drift apart. Flags win over the environment.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024


class ServerSettings(BaseSettings):
    """Settings of the OpenAI-compatible safevlm server."""

    model_config = SettingsConfigDict(env_prefix="SAFEVLM_", extra="forbid", validate_default=True)

    # -- model -----------------------------------------------------------------------------------
    model: str | None = Field(None, description="Base model folder (a Hugging Face LLaVA folder with its processor).")
    adapter: str | None = Field(None, description="Safety adapter folder (without one the safety modules are untrained).")
    policy: str = Field("default", description="Policy: a shipped name (default, strict, hint_only) or a YAML file.")
    served_model_name: str | None = Field(
        None, description="The model id clients send and /v1/models lists (default: the model folder's name)."
    )
    device: str | None = Field(None, description="cpu, cuda, cuda:1, ... (default: cuda if available).")
    dtype: typing.Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype (auto: float32 on CPU, bfloat16 on GPUs that support it, else float16)."
    )
    allow_base_mismatch: bool = Field(
        False, description="Load an adapter trained on a base with other weights (its fingerprint differs), "
        "with a warning; by default that is an error."
    )

    # -- network and access ----------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Interface to bind (127.0.0.1: this machine only).")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind (0: any free port).")
    api_key: SecretStr | None = Field(
        None, description="If set, every /v1 request needs 'Authorization: Bearer <key>'."
    )
    allow_remote_images: bool = Field(
        False, description="Fetch http(s) image URLs (off: only data: URLs with base64 images are accepted)."
    )
    remote_image_timeout_s: float = Field(10.0, gt=0, description="Timeout for fetching one remote image.")

    # -- limits ----------------------------------------------------------------------------------
    max_request_bytes: int = Field(16 * MiB, ge=1024, description="Largest request body, in bytes.")
    max_image_bytes: int = Field(8 * MiB, ge=1, description="Largest image after base64 decoding, in bytes.")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="Largest image, in pixels (width x height).")
    max_images: int = Field(
        1, ge=0, le=1, description="Images per request (the safety head reads one image per input; 0: text only)."
    )
    max_tokens: int = Field(512, ge=1, description="Most new tokens a request may ask for.")
    default_max_tokens: int = Field(128, ge=1, description="New tokens when a request does not say.")

    # -- scheduling ------------------------------------------------------------------------------
    max_batch_size: int = Field(8, ge=1, description="Most requests run together in one model call.")
    batch_wait_ms: float = Field(
        5.0, ge=0, description="How long the worker waits for more requests to batch with the first one."
    )
    max_queue: int = Field(256, ge=1, description="Requests waiting for the model; more get HTTP 503.")
    request_timeout_s: float = Field(300.0, gt=0, description="A request still waiting after this gets HTTP 504.")
    log_level: typing.Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Server log level."
    )

    # -- guard proxy (docs/serve.md, "guard in front of vLLM") -----------------------------------
    upstream: str | None = Field(
        None, description="Guard proxy: the API root (http://host:port/v1) of an OpenAI-compatible server "
        "(vLLM, SGLang, TGI) that generates. This server then loads only the guard and forwards allowed and "
        "hinted requests there; refusals never reach it."
    )
    upstream_model: str | None = Field(
        None, description="The model id sent to the upstream (default: the served model name)."
    )
    upstream_api_key_env: str | None = Field(
        None, description="Name of the environment variable that holds the upstream's API key (sent as "
        "'Authorization: Bearer'; never logged)."
    )
    upstream_timeout_s: float = Field(
        300.0, gt=0, description="Longest wait for the upstream: a whole plain answer, a stream's first "
        "bytes, or a stream's next chunk (HTTP 504 after)."
    )

    @model_validator(mode="after")
    def _check(self) -> ServerSettings:
        if self.upstream is not None:
            url = self.upstream.strip().rstrip("/")
            if not url.startswith(("http://", "https://")) or "://" == url[-3:]:
                raise ValueError(f"upstream must be an http(s) URL such as http://127.0.0.1:8000/v1, got {self.upstream!r}")
            self.upstream = url
        else:
            given = [name for name in ("upstream_model", "upstream_api_key_env") if getattr(self, name)]
            if given:
                raise ValueError(f"{', '.join(given)} only apply with upstream (the guard proxy); set upstream too")
        if self.default_max_tokens > self.max_tokens:
            if "default_max_tokens" not in self.model_fields_set:
                self.default_max_tokens = self.max_tokens
                return self
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens ({self.max_tokens})")
        return self

    @property
    def model_id(self) -> str:
        """The model id served."""
        if self.served_model_name:
            return self.served_model_name
        if self.model:
            return Path(self.model).resolve().name or "safevlm"
        return "safevlm"

    def api_key_value(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key is not None else None

    @property
    def proxy(self) -> bool:
        """Whether this server is a guard proxy in front of an upstream engine."""
        return self.upstream is not None


def _flag_type(annotation):
    """The argparse type and choices for a field annotation (Optional unwrapped)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _flag_type(args[0])
    if origin is typing.Literal:
        return str, list(typing.get_args(annotation))
    if annotation is SecretStr:
        return str, None
    return annotation, None


def add_settings_arguments(parser: argparse.ArgumentParser, settings_cls=ServerSettings) -> None:
    """One ``--flag`` per settings field, with the field's description as help. Defaults are
    None (unset), so the environment and the field defaults apply to flags not given."""
    for name, info in settings_cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{info.description} [env {settings_cls.model_config['env_prefix']}{name.upper()}"
        default = info.default
        if default is not None and name != "api_key":
            help_text += f"; default {default}"
        help_text += "]"
        kind, choices = _flag_type(info.annotation)
        if kind is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=name, type=kind, choices=choices, default=None, help=help_text)


def settings_from_args(args: argparse.Namespace, settings_cls=ServerSettings) -> ServerSettings:
    """Settings from parsed flags (given flags override the environment)."""
    given = {name: getattr(args, name) for name in settings_cls.model_fields if getattr(args, name, None) is not None}
    return settings_cls(**given)


__all__ = ["MiB", "ServerSettings", "add_settings_arguments", "settings_from_args"]
