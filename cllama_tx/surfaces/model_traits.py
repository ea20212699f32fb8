"""
What a target model takes, as far as a translated or swapped request must
know: its output limit, how it reasons (OpenAI's C{reasoning_effort},
Anthropic's thinking and effort), whether its sampling is fixed, whether it
takes the long-context beta.  A translation asks these questions of the
model the request goes to, so that a field is mapped where the model takes
it and dropped where it would be refused.

The values come from the provider catalog's data
(L{cllama_tx.providers.model_limits}); an unknown model answers the most
cautious way (no limit known, no reasoning control).  Pure data.
"""

from __future__ import annotations

import attrs

__all__ = ["ADAPTIVE", "BUDGET", "ModelTraits", "UNKNOWN_MODEL"]

#: Anthropic thinking kinds: C{{type: adaptive}} (the model decides, with
#: C{output_config.effort}) or C{{type: enabled, budget_tokens}}.
ADAPTIVE = "adaptive"
BUDGET = "budget"


@attrs.frozen
class ModelTraits:
    """
    @ivar known: the catalog knows the model (else every answer below is
        the cautious one).
    @ivar max_output_tokens: the most output tokens one answer may ask for.
    @ivar reasoning_efforts: the C{reasoning_effort} values an OpenAI-format
        model takes (empty: it takes none, and refuses the field).
    @ivar thinking: how an Anthropic model thinks (L{ADAPTIVE}, L{BUDGET}),
        or None when it cannot.
    @ivar effort: an Anthropic model takes C{output_config.effort}.
    @ivar fixed_sampling: a reasoning model that refuses C{temperature} and
        C{top_p} other than their defaults.
    @ivar long_context: an Anthropic model that takes the 1M-context beta.
    """

    known: bool = False
    max_output_tokens: int | None = None
    reasoning_efforts: frozenset[str] = frozenset()
    thinking: str | None = None
    effort: bool = False
    fixed_sampling: bool = False
    long_context: bool = False


UNKNOWN_MODEL = ModelTraits()
