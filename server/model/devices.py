"""The one meaning of a ``--device`` value, for every command and the loader alike."""

from __future__ import annotations

import torch


def resolve_device(name: str | torch.device | None) -> torch.device:
    """'auto' / None -> cuda if available else cpu; otherwise 'cpu', 'cuda', 'cuda:N'. Asking for
    CUDA on a machine without it is an error here, before anything is read."""
    if isinstance(name, torch.device):
        device = name
    elif name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError as e:
            raise ValueError(f"device: {name!r} is not a device (use auto, cpu, cuda or cuda:N)") from e
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: {str(device)!r} is not supported (use auto, cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {str(device)!r} asked for but CUDA is not available on this machine")
    return device
