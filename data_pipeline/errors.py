"""The errors `python -m data_pipeline.build` reports as one `error: ...` line (exit status 1), no traceback.

The same style as the trainer's (agentlm_jax/errors.py): each message says what is wrong and what to do;
bad command-line syntax is argparse's usage line with exit status 2; anything else that escapes is a bug and
keeps its traceback.
"""

from __future__ import annotations


class BuildError(Exception):
    """The build cannot run as configured."""


class ConfigError(BuildError, ValueError):
    """The config file is missing, not YAML, or has an unknown key or a bad value; the message names it."""


class SourceError(BuildError, RuntimeError):
    """A source cannot be read (an unset environment variable, a missing file, an unreachable hub...)."""


class TokenizerError(BuildError):
    """The tokenizer cannot be loaded, or the configured system prompt holds its special-token text."""


class OutputError(BuildError):
    """The output is not empty (and --overwrite was not given), or it overlaps an input."""


class TemplateError(BuildError):
    """More than max_template_reject_fraction of the records do not encode as the chat template's contract
    requires (template_not_prefix_stable, template_mismatch); the message names the first."""
