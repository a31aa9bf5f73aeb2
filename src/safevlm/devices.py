"""Which torch device a ``--device`` flag (or ``device=`` argument) names: one check for all.

:func:`resolve_device` turns ``None`` / ``"auto"`` into the default (``cuda`` when a GPU is
visible, else ``cpu``) and checks an explicit name against what this machine has, so that
``--device cuda`` on a CPU-only PyTorch or ``--device foo`` is a one-line error naming the
allowed forms, never a traceback from deep inside ``model.to()``.
"""

from __future__ import annotations

from safevlm.errors import UsageError

DEVICE_FORMS = "cpu, cuda, cuda:N (N = GPU index), mps, or auto (cuda when a GPU is visible, else cpu)"


def resolve_device(name: str | None = None) -> str:
    """The device string for ``name`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``).

    Raises:
        UsageError (a ValueError): an unknown form, or a device this machine does not have
        (CUDA on a CPU-only PyTorch build or without a visible GPU, a GPU index out of
        range, MPS off macOS); the message names the allowed forms.
    """
    import torch

    text = "auto" if name is None else str(name).strip().lower()
    if text in ("", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown device {name!r}; use {DEVICE_FORMS}") from None
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this PyTorch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA GPU is visible")
            raise UsageError(f"device {name!r} asked for, but {why} (torch {torch.__version__}); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(
                f"device {name!r} asked for, but {count} CUDA GPU(s) are visible (cuda:0..cuda:{count - 1})"
            )
        return str(device)
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UsageError(f"device {name!r} asked for, but MPS is not available here; use --device cpu")
        return "mps"
    raise UsageError(f"unsupported device {name!r}; use {DEVICE_FORMS}")


__all__ = ["DEVICE_FORMS", "resolve_device"]
