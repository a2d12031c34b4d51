"""Exception family of moonshot-fx.

Every error raised on bad input derives from :class:`MoonshotError`, so a caller can catch the
whole family; each subclass names what was wrong, and its message says how to fix it.
"""
from __future__ import annotations


class MoonshotError(Exception):
    """Base class of every error moonshot-fx raises on purpose."""


class PatternError(MoonshotError, ValueError):
    """A sparsity pattern that does not parse or does not fit a weight (e.g. N:M with in % M != 0)."""


class ConfigError(MoonshotError, ValueError):
    """An invalid option: unknown method, alpha outside [0, 1], bad glob, unknown config key."""


class TraceError(MoonshotError, RuntimeError):
    """The model could not be captured as a graph by torch.export nor torch.fx.symbolic_trace."""


class NoPrunableSitesError(MoonshotError, ValueError):
    """Discovery (after include/exclude filtering) found no weight to prune."""


class CalibrationError(MoonshotError, ValueError):
    """Calibration data is empty, malformed, or produced non-finite statistics."""


class LinalgError(MoonshotError, RuntimeError):
    """A Hessian stayed non positive-definite after every dampening retry."""


class BackendUnavailableError(MoonshotError, RuntimeError):
    """A deployment backend cannot run here (no CUDA, missing package, unsupported shape)."""


class LossError(CalibrationError):
    """No default loss fits the model's output (MOONSHOT's Fisher, ``alpha="auto"``): pass ``loss_fn``."""


class MetaDeviceError(MoonshotError, ValueError):
    """The model's weights or the inputs are on the ``meta`` device (shapes only, no values)."""


class ModelLoadError(MoonshotError, ValueError):
    """A ``--model`` given by the user could not be loaded: a missing path, a form that is none of
    the supported ones (Hugging Face directory, ``.gguf`` file, ``timm:NAME`` / ``torchvision:NAME``),
    a missing tokenizer, an unknown timm/torchvision name, a checkpoint that does not fit."""


class DataFileError(CalibrationError):
    """A user data file (calibration or evaluation text, calibration images) is missing or malformed:
    e.g. a JSONL line without a ``text`` field, too few tokens for one window, images of the wrong rank."""


class SaveError(MoonshotError, OSError):
    """The pruned model could not be written where asked (the destination exists and ``--overwrite``
    was not given, or its parent is not writable)."""


class MissingExtraError(MoonshotError, ImportError):
    """An optional dependency (a pip extra such as ``plots``) is needed and not installed."""


class PatternWarning(UserWarning):
    """Weights kept dense because their input size does not fit the N:M pattern (``strict=False``)."""
