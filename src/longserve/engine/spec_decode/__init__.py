"""Speculative decoding: proposers draft the tokens that likely follow a sequence (``ngram``, ``suffix``), the
``Speculator`` decides who drafts and how many, and ``rejection`` accepts drafts so that the output is exactly
what plain decoding would sample."""
