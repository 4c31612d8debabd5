"""A minimal tokenizer interface shared by every backbone source.

The decoder needs four things from a tokenizer: encode, decode, the EOS ids and (for chat models)
a chat template. HF tokenizers, Mistral's own `mistral_common` tokenizer and the byte tokenizer
used by tiny random test backbones are wrapped behind the same small class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Tokenizer:
    name: str
    vocab_size: int
    bos_id: int | None
    eos_ids: set[int] = field(default_factory=set)
    hf: object | None = None  # the wrapped HF tokenizer, when there is one (lm-eval wants it)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    @property
    def has_chat(self) -> bool:
        """Whether `apply_chat` wraps the text in a chat template (else it encodes it plainly)."""
        return False

    def apply_chat(self, user_text: str) -> list[int]:
        """Token ids of a one-turn chat prompt; plain encoding when there is no template."""
        return self.encode(user_text)


class HFTokenizer(Tokenizer):
    def __init__(self, tok, name: str = "hf"):
        eos = set()
        if tok.eos_token_id is not None:
            eos.add(int(tok.eos_token_id))
        super().__init__(name=name, vocab_size=len(tok), bos_id=tok.bos_token_id, eos_ids=eos, hf=tok)

    def encode(self, text, add_bos=True):
        # The tokenizer's own rule decides whether a BOS goes first (Llama/Mistral: yes;
        # SmolLM2: no — its "bos" id is <|im_start|>, a chat marker, not a document start).
        return list(self.hf.encode(text, add_special_tokens=add_bos))

    def decode(self, ids):
        return self.hf.decode(ids, skip_special_tokens=False)

    @property
    def has_chat(self):
        return bool(getattr(self.hf, "chat_template", None))

    def apply_chat(self, user_text):
        if self.has_chat:
            out = self.hf.apply_chat_template(
                [{"role": "user", "content": user_text}], add_generation_prompt=True, tokenize=True
            )
            if isinstance(out, dict) or hasattr(out, "keys"):
                out = out["input_ids"]
            return list(out)
        return self.encode(user_text)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes + BOS/EOS/PAD: lets tiny random backbones run with no downloaded vocabulary."""

    OFFSET = 3  # 0 = pad, 1 = bos, 2 = eos

    def __init__(self):
        super().__init__(name="bytes", vocab_size=256 + self.OFFSET, bos_id=1, eos_ids={2})

    def encode(self, text, add_bos=True):
        ids = [b + self.OFFSET for b in text.encode("utf-8")]
        return ([self.bos_id] if add_bos else []) + ids

    def decode(self, ids):
        # Ids past the byte range (a random 7B-shaped model has 32,768) have no text: dropped.
        data = bytes(i - self.OFFSET for i in ids if self.OFFSET <= i < self.OFFSET + 256)
        return data.decode("utf-8", errors="replace")


class MistralCommonTokenizer(Tokenizer):
    """Mistral's native tokenizer files (tokenizer.model.v3 / tekken.json) via `mistral_common`."""

    def __init__(self, path: str):
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        mt = MistralTokenizer.from_file(str(path))
        self._mt = mt
        self._raw = mt.instruct_tokenizer.tokenizer
        super().__init__(
            name=f"mistral_common:{path}",
            vocab_size=self._raw.n_words,
            bos_id=self._raw.bos_id,
            eos_ids={self._raw.eos_id},
        )

    def encode(self, text, add_bos=True):
        return self._raw.encode(text, bos=add_bos, eos=False)

    def decode(self, ids):
        return self._raw.decode(ids)

    has_chat = True  # mistral_common's instruct format

    def apply_chat(self, user_text):
        from mistral_common.protocol.instruct.messages import UserMessage
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        req = ChatCompletionRequest(messages=[UserMessage(content=user_text)])
        return list(self._mt.encode_chat_completion(req).tokens)


def bundled_mistral_v3_path() -> Path | None:
    """Mistral's v3 tokenizer (32,768 tokens, as Mistral-7B-v0.3 and Codestral Mamba use) as
    shipped inside the `mistral_common` wheel, or None when that package is absent. The wheel
    names it e.g. `mistral_instruct_tokenizer_240323.model.v3`, hence the loose pattern."""
    try:
        import mistral_common
    except ImportError:
        return None
    hits = sorted(Path(mistral_common.__file__).parent.rglob("*.model.v3"))
    return hits[0] if hits else None
