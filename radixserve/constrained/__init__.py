"""Structured output: json_schema, regex and ebnf grammars, enforced by token masks.

The scheduler talks only to GrammarManager; the sampler only to VocabMask.
"""

from radixserve.constrained.grammar_manager import GrammarManager, ReqGrammar
from radixserve.constrained.xgrammar_backend import ANY_JSON, GrammarError, VocabMask

__all__ = ["ANY_JSON", "GrammarError", "GrammarManager", "ReqGrammar", "VocabMask"]
