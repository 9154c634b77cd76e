"""What every ``vitdecomp`` subcommand shares: the help formatter (examples kept as written, defaults shown),
deprecated flag spellings kept as hidden aliases, and the check that a cache or an aligner belongs to the model a
command was given."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

__all__ = ["HelpFormatter", "deprecated_alias", "refuse_other_model", "show_defaults", "model_check_arg",
           "input_check_arg"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Epilogs as written; every option whose default means something gets "(default: X)" appended (unless its
    help already names the default)."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if "default" in text or not _meaningful(d) or not action.option_strings or action.nargs == 0:
            return text
        shown = " ".join(map(str, d)) if isinstance(d, (list, tuple)) else d
        return f"{text} (default: {shown})" if text else f"(default: {shown})"


def _meaningful(d) -> bool:
    return not (d is None or d is False or d == [] or d is argparse.SUPPRESS)


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Give every option of ``parser`` and its subcommands that has a meaningful default but no help text a help
    text naming the default (options with help get it appended by :class:`HelpFormatter`)."""
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sp in a.choices.values():
                show_defaults(sp)
        elif a.option_strings and a.help is None and a.nargs != 0 and _meaningful(a.default):
            a.help = "(default: %(default)s)"


class _Deprecated(argparse.Action):
    """Store like the canonical option and say on stderr which spelling to use instead."""

    def __init__(self, option_strings, dest, canonical: str = "", const=None, nargs=None, **kw):
        self.canonical = canonical
        super().__init__(option_strings, dest, nargs=nargs, const=const, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"vitdecomp: warning: {option_string} is deprecated; use {self.canonical}", file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def deprecated_alias(parser, old: str, canonical: str, dest: str, *, flag: bool = False, **kw) -> None:
    """Accept ``old`` as a hidden spelling of ``canonical`` (same ``dest``); ``flag``: a store-true switch."""
    if flag:
        kw.update(nargs=0, const=True)
    parser.add_argument(old, dest=dest, action=_Deprecated, canonical=canonical, help=argparse.SUPPRESS,
                        default=argparse.SUPPRESS, **kw)


def model_check_arg(p) -> None:
    """``--no-model-check`` on every command that applies an aligner (``Aligner.load(..., check_model=False)``)."""
    p.add_argument("--no-model-check", action="store_true",
                   help="apply the aligner even though it was fitted on other weights than the cache's or the model's (same component names and sizes: a fine-tuned copy, another --random-init seed); by default that is an error naming both weight fingerprints")


def input_check_arg(p) -> None:
    """``--no-input-check`` on every command that decomposes images (``check_input=False``)."""
    p.add_argument("--no-input-check", action="store_true",
                   help="accept images outside the range the model's preprocessing produces (by default 0-255 "
                        "pixel values and unnormalised [0, 1] images for a normalising model are an error)")


def _difference(a: Sequence[str], b: Sequence[str]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"first difference at position {i}: {x!r} versus {y!r}"
    return f"{len(a)} versus {len(b)} components, common prefix of {min(len(a), len(b))}"


def refuse_other_model(what: str, path, *, names: Sequence[str], model_name: Optional[str] = None,
                       dim: Optional[int] = None, fingerprint: Optional[str] = None,
                       expected_names: Sequence[str], expected_model: Optional[str] = None,
                       expected_dim: Optional[int] = None, expected_fingerprint: Optional[str] = None,
                       expected_what: str = "the model") -> None:
    """Raise :class:`MismatchError` when a cache or aligner (``what`` at ``path``) was made for another model than
    the one in use: different component names, representation dimension D, model string or weights fingerprint
    (:func:`vitdecomp.weights_fingerprint`; the last two compared only when both sides record them). Aligners'
    weight fingerprints are checked by :meth:`vitdecomp.Aligner.check_source` against the cache they are applied to."""
    from .errors import MismatchError

    problems = []
    if model_name and expected_model and model_name != expected_model:
        problems.append(f"it was made for {model_name!r}, {expected_what} is {expected_model!r}")
    if dim is not None and expected_dim is not None and int(dim) != int(expected_dim):
        problems.append(f"its representation dimension is D = {dim}, {expected_what}'s is D = {expected_dim}")
    if tuple(names) != tuple(expected_names):
        problems.append(f"its {len(names)} components differ from the {len(expected_names)} of {expected_what} "
                        f"({_difference(tuple(names), tuple(expected_names))})")
    if fingerprint and expected_fingerprint and fingerprint != expected_fingerprint and not problems:
        problems.append(f"its weights fingerprint is {fingerprint}, {expected_what}'s is {expected_fingerprint} "
                        "(other weights, or another --random-init seed)")
    if problems:
        raise MismatchError(f"{what} {path} belongs to another model: " + "; ".join(problems)
                            + f". Use the {what} made with {expected_what} (same model string, weights and settings).")
