"""The xgrammar backend: compiles grammars and masks logits with their token bitmasks.

Everything that touches xgrammar lives here, so that a second backend would replace this
one file. xgrammar is imported only when a grammar is first used.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any

import torch

from radixserve.core.sampling_params import SamplingParams
from radixserve.device_utils import to_device_beside

# `json_schema` set to this value means "any JSON object or array" (xgrammar's built-in
# JSON grammar): what OpenAI's response_format {"type": "json_object"} asks for.
ANY_JSON = "$$ANY$$"

GRAMMAR_KINDS = ("json_schema", "regex", "ebnf", "structural_tag")
# (kind, text): kind is one of GRAMMAR_KINDS. Also the compile cache's key.
GrammarKey = tuple[str, str]


class GrammarError(ValueError):
    """A json_schema, regex or ebnf that cannot be compiled; its message names the problem."""


def grammar_key(params: SamplingParams) -> GrammarKey | None:
    """The request's grammar as a cache key, or None when it has none."""
    for kind in GRAMMAR_KINDS:
        text = getattr(params, kind)
        if text is None:
            continue
        if not isinstance(text, str):
            raise GrammarError(f"{kind} must be a string, got {type(text).__name__}")
        return kind, text
    return None


class XGrammarBackend:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int],
                 max_threads: int) -> None:
        import xgrammar as xgr

        # The bitmask must cover the model's whole (possibly padded) vocabulary, or the
        # padded ids would stay unmasked.
        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids or None)
        # Our GrammarManager caches compiled grammars by key; a second cache would only
        # hold the same objects twice.
        self.compiler = xgr.GrammarCompiler(info, max_threads=max_threads, cache_enabled=False)

    def compile(self, key: GrammarKey) -> Any:
        """A CompiledGrammar; raises GrammarError naming what is wrong."""
        kind, text = key
        if kind == "json_schema" and text == ANY_JSON:
            return self.compiler.compile_builtin_json_grammar()
        if kind == "json_schema":
            try:
                json.loads(text)
            except json.JSONDecodeError as e:
                raise GrammarError(f"json_schema is not valid JSON: {e}") from None
            # json_schema_ebnf names a bad schema itself; the EBNF it writes compiles.
            return self.compiler.compile_grammar(json_schema_ebnf(text))
        try:
            if kind == "regex":
                return self.compiler.compile_regex(text)
            if kind == "structural_tag":
                return self._compile_structural_tag(text)
            return self.compiler.compile_grammar(text)
        # xgrammar reports every user error as a RuntimeError from C++ (a few as
        # ValueError); whatever fails to compile is the request's fault.
        except Exception as e:  # noqa: BLE001
            raise GrammarError(f"invalid {kind}: {_clean_message(str(e))}") from None

    def _compile_structural_tag(self, text: str) -> Any:
        """SGLang's form {"structures": [{"begin", "schema", "end"}], "triggers"}, or
        xgrammar's own structural tag JSON (passed through)."""
        import xgrammar as xgr

        tag = json.loads(text)
        if not isinstance(tag, dict) or "structures" not in tag:
            return self.compiler.compile_structural_tag(text)
        items = [xgr.StructuralTagItem(begin=s["begin"], end=s["end"],
                                       schema=json.dumps(s.get("schema", s.get("parameters"))))
                 for s in tag["structures"]]
        return self.compiler.compile_structural_tag(items, list(tag.get("triggers") or []))

    @staticmethod
    def new_matcher(compiled: Any, stop_token_ids: list[int] | None) -> Any:
        import xgrammar as xgr

        return xgr.GrammarMatcher(compiled, override_stop_tokens=stop_token_ids or None)


def json_schema_ebnf(schema: str) -> str:
    """The EBNF grammar of a JSON schema, as every json_schema request and tool call uses it.

    Compact separators and no free whitespace: with any_whitespace a model can loop on
    whitespace tokens forever and never close the object. Needs no tokenizer, so the HTTP
    layer also calls it to reject a bad schema before the request is queued; raises
    GrammarError naming the problem.
    """
    import xgrammar as xgr

    try:
        ebnf = str(xgr.Grammar.from_json_schema(schema, any_whitespace=False))
    except Exception as e:  # noqa: BLE001 -- xgrammar raises RuntimeError from C++
        raise GrammarError(f"invalid json_schema: {_clean_message(str(e))}") from None
    # xgrammar (0.2.8 and before) lets strings with minLength/maxLength hold raw control
    # characters, which JSON forbids (mlc-ai/xgrammar#800): narrow that character class.
    # Once xgrammar prints a fixed class, this replaces nothing.
    return ebnf.replace(_BOUNDED_STRING_CHAR, _JSON_STRING_CHAR)


_BOUNDED_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\]'


@dataclass
class VocabMask:
    """The allowed tokens of the batch rows that have a grammar, as a packed bitmask."""

    bitmask: torch.Tensor  # [B, ceil(V / 32)] int32 on the logits' device; bit set = allowed
    # The rows that have a grammar (the others are left alone), on the logits' device;
    # None when every row has one.
    rows: torch.Tensor | None

    def apply(self, logits: torch.Tensor) -> None:
        """Set the disallowed logits of the grammar rows to -inf, in place, on the device."""
        import xgrammar as xgr

        xgr.apply_token_bitmask_inplace(logits, self.bitmask, indices=self.rows)


def fill_vocab_mask(matchers: list[Any | None], vocab_size: int, device: torch.device | str,
                    buffers: HostBitmasks) -> VocabMask | None:
    """Fill each row's bitmask from its matcher (None: no grammar) into one of `buffers`
    and send it to `device`; None when no row needs a mask."""
    # A terminated matcher belongs to a request that ended on the previous step's
    # token (seen one step late by the overlapped loop): its row's token is dropped,
    # and a terminated matcher has no next-token mask, so leave the row unmasked.
    rows = [i for i, m in enumerate(matchers) if m is not None and not m.is_terminated()]
    if not rows:
        return None
    bitmask = buffers.take(len(matchers), vocab_size)
    # One call fills every row, on xgrammar's own threads, without the GIL. Rows left
    # out keep stale bits, which is harmless: only `rows` are applied.
    _batch_matcher().batch_fill_next_token_bitmask([matchers[i] for i in rows], bitmask, rows)
    # Row indices go to the device as a tensor: given a list, xgrammar would copy it from
    # pageable memory, which blocks the host until the forward in flight ends.
    indices = None if len(rows) == len(matchers) else torch.tensor(rows, dtype=torch.int32)
    if torch.device(device).type != "cuda":
        return VocabMask(bitmask, indices)
    # The forward is already queued on the current stream; queued behind it, the
    # copies would wait for it and then hold up the sampling. On a side stream they run
    # during the forward, and the sampling, queued after this, waits for them. The host
    # bitmask is not refilled before the copy has read it: HostBitmasks hands it out
    # again two fills later, after the scheduler has waited for this batch's sampled
    # tokens, which are sampled only once the copy is done. The indices' staging buffer
    # is the caching host allocator's, which holds it until the side stream's copy ends.
    host = [bitmask] if indices is None else [bitmask, indices.pin_memory()]
    uploaded = to_device_beside(host, device)
    return VocabMask(uploaded[0], None if indices is None else uploaded[1])


def accept_tokens(matchers: list[Any], tokens: list[int]) -> list[bool]:
    """Advance each matcher by its token, on xgrammar's threads; False where refused."""
    if len(matchers) == 1:
        return [matchers[0].accept_token(tokens[0])]
    return _batch_matcher().batch_accept_token(matchers, tokens)


class HostBitmasks:
    """Two host bitmask buffers of one model runner, used in turn, so that a step
    neither allocates (nor pins) a [B, V/32] tensor: a buffer is refilled only two fills
    later, after the scheduler has waited for the batch whose asynchronous copy read it."""

    def __init__(self, pinned: bool) -> None:
        self.pinned = pinned
        self._bufs: list[torch.Tensor | None] = [None, None]
        self._turn = 0

    def take(self, rows: int, vocab_size: int) -> torch.Tensor:
        import xgrammar as xgr

        self._turn ^= 1
        shape = xgr.get_bitmask_shape(rows, vocab_size)
        buf = self._bufs[self._turn]
        if buf is None or buf.shape[0] < rows or buf.shape[1] != shape[1]:
            buf = torch.empty((max(rows, 64), shape[1]), dtype=xgr.bitmask_dtype,
                              pin_memory=self.pinned)
            self._bufs[self._turn] = buf
        return buf[:rows]



@functools.lru_cache(maxsize=1)
def _batch_matcher() -> Any:
    import xgrammar as xgr

    return xgr.BatchGrammarMatcher()


# xgrammar's C++ errors start with "[time] file.cc:line: " and sometimes a check's text.
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")


def _clean_message(message: str) -> str:
    return _CPP_PREFIX.sub("", message.strip()).strip()
