"""Grammar state of constrained requests and the token masks of their next tokens, in the scheduler.

The scheduler knows every request's accepted tokens in order, across preemptions (recompute and swap
keep the output tokens) and whatever the prefix cache served (the grammar reads outputs only): it owns
each request's matcher, advances it with every token that comes back, and sends each step the bitmask
of its constrained rows. The masks of a batch are filled in llguidance's threads, outside the GIL, into one
buffer reused step after step: a grammar row's mask is on the critical path of an overlapped step, and
allocating and copying 1.2 MB per step (64 rows of a 152k vocabulary) took a third as long as filling it.

A new request's matcher is built in a thread of its own, with its first mask (`compile`): llguidance builds a
grammar's lexer at the first mask, about 1 ms for the offline bench's schema but 0.39 s for `a{1000000}` (CI
machine), which on the engine's loop every stream would wait for. The scheduler admits the request once
that is done. Requests mostly repeat their constraints (a client's schema, an agent's tools): the last grammars
written and matchers built are kept: a request whose constraint was seen gets its grammar without writing it
on the engine's loop again (0.3 ms for the offline bench's schema, 1.0 ms for it as a structural tag, Qwen3's
vocabulary on the CI machine) and a copy of its matcher at the start (a microsecond) instead of a build (0.9 and
3.0 ms until built, the first mask included; docs/performance.md, thirty-seventh section).
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import llguidance.numpy
import numpy

from sfllm.sampling_params import StructuredOutput
from sfllm.scheduler.grammar_after_thought import GrammarAfterThought
from sfllm.structured_output import CONSTRAINT_PARAM, InvalidGrammar, grammar_of


KEPT = 64  # grammars, and matchers at their start, kept for the requests that repeat a constraint


class GrammarMatchers:
    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int],
                 num_threads: int | None = None) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        # Built now, with the engine: 0.36 s for Qwen3's 151,936 tokens on the CI machine, holding the GIL.
        # Built on the first grammar instead, it stalled every stream of the engine's loop that long, and it
        # fell inside the offline benchmark's timed run (docs/performance.md).
        self._tokenizer: llguidance.LLTokenizer | None = None
        self.unavailable = ""  # why structured outputs cannot be served, when they cannot
        if not eos_token_ids:
            self.unavailable = ("structured outputs are not available for this model: it has no end-of-sequence "
                                "token, which a grammar needs to end the output")
        else:
            try:
                self._tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos_token_ids)
            except (ValueError, RuntimeError) as error:  # a tokenizer llguidance cannot read: the rest still serves
                first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
                self.unavailable = f"structured outputs are not available for this model's tokenizer: {first_line}"
        # llguidance drops the GIL while it builds a matcher and its first mask: two such builds at a time
        self._compiler = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar")
        # llguidance's default thread count (80% of the CPUs, up to 32) unless given
        self._executor = llguidance.LLExecutor() if num_threads is None else llguidance.LLExecutor(num_threads=num_threads)
        self._bitmask = llguidance.numpy.allocate_token_bitmask(0, vocab_size)
        self._grammars: OrderedDict[tuple[str, str], str] = OrderedDict()  # written on the engine's loop only
        self._started: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()  # never advanced: copied
        self._started_lock = threading.Lock()  # the compiler's threads share them

    def built_for(self, vocab_size: int, eos_token_ids: list[int]) -> bool:
        return vocab_size == self.vocab_size and list(eos_token_ids) == self.eos_token_ids

    def compile(self, structured_output: StructuredOutput) -> Future[llguidance.LLMatcher | GrammarAfterThought]:
        """A matcher at the start of the grammar, its first mask computed, built in a thread; raises
        InvalidGrammar now for what the grammar's own check finds. A grammar that fails only against the
        tokenizer gives a matcher in error, found out at the request's first mask like one failing later.
        With `after_thought`, the matcher waits for the model's thought to end (GrammarAfterThought)."""
        grammar, thought = self.check(structured_output), structured_output.after_thought
        if thought is not None:
            return self._compiler.submit(lambda: GrammarAfterThought(self._build(grammar), thought))
        return self._compiler.submit(self._build, grammar)

    def check(self, structured_output: StructuredOutput) -> str:
        """The grammar engine's form of the constraint; raises InvalidGrammar for what is wrong with it before
        a matcher is built (a grammar that fails only against the tokenizer is found at its first mask)."""
        thought = structured_output.after_thought
        for token in () if thought is None else (thought.start, thought.end):
            if not 0 <= token < self.vocab_size:
                raise InvalidGrammar(CONSTRAINT_PARAM, f"the thought's token {token} is outside the "
                                                       f"vocabulary [0, {self.vocab_size})")
        return self._grammar(structured_output)

    def matcher(self, structured_output: StructuredOutput) -> llguidance.LLMatcher | GrammarAfterThought:
        """compile's matcher, built here; raises InvalidGrammar, also for a matcher in error."""
        matcher = self.compile(structured_output).result()
        if matcher.is_error():
            raise InvalidGrammar(CONSTRAINT_PARAM, matcher.get_error())
        return matcher

    def _grammar(self, structured_output: StructuredOutput) -> str:
        if self._tokenizer is None:
            raise InvalidGrammar(CONSTRAINT_PARAM, self.unavailable)
        key = (structured_output.kind, structured_output.definition)
        grammar = self._grammars.get(key)
        if grammar is None:
            grammar = grammar_of(structured_output, special_token=self._special_token)
        _keep(self._grammars, key, grammar)
        return grammar

    def _special_token(self, text: str) -> int | None:
        """The id of the special token written `text` (a structural tag's trigger, begin or end such as
        `<|python_tag|>`), or None."""
        tokens = self._tokenizer.tokenize_str(text)
        return tokens[0] if len(tokens) == 1 and self._tokenizer.is_special_token(tokens[0]) else None

    def _build(self, grammar: str) -> llguidance.LLMatcher:
        with self._started_lock:
            started = self._started.get(grammar)
            if started is not None:
                _keep(self._started, grammar, started)
                return started.deep_copy()
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if not matcher.is_error():
            matcher.compute_bitmask()  # builds the lexer states of the start: the first mask's cost
            with self._started_lock:
                _keep(self._started, grammar, matcher.deep_copy())
        return matcher

    def masks(self, matchers: list[llguidance.LLMatcher | GrammarAfterThought | None]) -> memoryview:
        """The packed bitmask of the next token of each matcher, one row each; a row of None (its request
        finished), of a matcher in error or of a thought allows every token: its token is never read (a thought's
        is free). The view is of a buffer the next call overwrites: send it (the worker copies it at once) before
        asking for more."""
        if len(self._bitmask) < len(matchers):
            self._bitmask = llguidance.numpy.allocate_token_bitmask(max(len(matchers), 2 * len(self._bitmask)),
                                                                    self.vocab_size)
        bitmask = self._bitmask[:len(matchers)]
        live = []
        may_open_thought = []
        for row, matcher in enumerate(matchers):
            if isinstance(matcher, GrammarAfterThought):
                if not matcher.masked_by_grammar:
                    bitmask[row] = -1
                    continue
                if matcher.phase == "open":
                    may_open_thought.append((row, matcher.thought.start))
                matcher = matcher.matcher
            if matcher is None or matcher.is_error():
                bitmask[row] = -1
            else:
                live.append((matcher, row))  # llguidance writes the whole row, even for a matcher that fails
        if live:
            llguidance.numpy.fill_next_token_bitmask_par(self._executor, live, bitmask)
        if may_open_thought:
            words = bitmask.view(numpy.uint32)
            for row, token in may_open_thought:
                words[row, token >> 5] |= numpy.uint32(1 << (token & 31))
        return memoryview(bitmask).cast("B")


# llguidance's errors when a grammar outgrows its resource limits (LLParserLimits), e.g. `a{1000000}`, whose
# only allowed token "aaaa" cannot be consumed: the grammar's fault, not the server's
LIMIT_ERRORS = ("too many expressions constructed", "fuel exhausted", "too many states", "too many items", "exceeded",
                "current row has")  # "Current row has 2001 items; max is 2000": an alternation of 2,001 literals


def exceeded_limits(error: str) -> bool:
    return any(text in error.lower() for text in LIMIT_ERRORS)


def _keep(kept: OrderedDict, key, value) -> None:
    """`value` kept as the newest of `kept`, the oldest beyond KEPT let go."""
    kept[key] = value
    kept.move_to_end(key)
    while len(kept) > KEPT:
        kept.popitem(last=False)


def accepts(matcher: llguidance.LLMatcher, token: int) -> bool:
    """Advances the matcher past `token`; False when the grammar does not allow it."""
    return matcher.consume_token(token) and not matcher.is_error()
