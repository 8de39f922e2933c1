"""Which errors the engine cannot survive.

Most failures belong to the requests of one step and the engine goes on (see core.py). A few
CUDA errors are "sticky": once raised, the CUDA context is corrupt and every later call on the
device fails or, worse, returns garbage. The only recovery is a new process, so the engine
fails everything, marks itself dead (/health 503) and the server exits non-zero for its
supervisor to restart it. torch reports them as ``torch.AcceleratorError`` (a RuntimeError)
carrying the CUDA runtime's message; the message is what tells them apart, and it is the same
text on every torch version since CUDA's error strings are fixed.
"""

from __future__ import annotations

# cudaGetErrorString texts of the errors that leave the context unusable ("sticky" errors in
# the CUDA runtime documentation), lowercased
STICKY_CUDA_ERRORS = (
    "an illegal memory access was encountered",  # cudaErrorIllegalAddress
    "device-side assert triggered",  # cudaErrorAssert
    "an illegal instruction was encountered",  # cudaErrorIllegalInstruction
    "misaligned address",  # cudaErrorMisalignedAddress
    "operation not supported on global/shared address space",  # cudaErrorInvalidAddressSpace
    "invalid program counter",  # cudaErrorInvalidPc
    "unspecified launch failure",  # cudaErrorLaunchFailure
    "hardware stack error",  # cudaErrorHardwareStackError
    "uncorrectable ecc error encountered",  # cudaErrorECCUncorrectable
    "cudaerrorillegaladdress",
    "cudaerrorassert",
    "cudaerrorlaunchfailure",
)


class EngineFatal(RuntimeError):
    """Raised on the engine thread to stop it: the device (or the engine's own state) can no
    longer be trusted, so no request may be answered from it any more."""


def is_fatal(error: BaseException) -> bool:
    """True for EngineFatal and for sticky CUDA errors, anywhere in the exception's chain."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, EngineFatal):
            return True
        if isinstance(current, RuntimeError):
            text = str(current).lower()
            if any(marker in text for marker in STICKY_CUDA_ERRORS):
                return True
        current = current.__cause__ or current.__context__
    return False
