"""Incremental detokenisation with stop strings."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas; holds back text that may still become a stop string."""

    tokenizer: object
    stop: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the text already returned
    stopped: bool = False

    def _text(self) -> str:
        return self.tokenizer.decode(self.token_ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add a token; return the text that is now safe to show. Sets ``stopped`` on a stop string."""
        self.token_ids.append(token_id)
        text = self._text()
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        if self.stop:
            search_from = max(0, self.emitted - max(len(s) for s in self.stop) + 1)
            hits = [i for i in (text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                cut = min(hits)
                self.stopped = True
                delta = text[self.emitted : cut]
                self.emitted = max(self.emitted, cut)
                return delta
        safe = len(text) - self._held_back(text)
        delta = text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return delta

    def _held_back(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        """Text held back at the end of generation (no stop string followed)."""
        if self.stopped:
            return ""
        text = self._text().rstrip("\ufffd")
        delta = text[self.emitted :]
        self.emitted = len(text)
        return delta
