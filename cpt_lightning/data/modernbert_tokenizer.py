"""ModernBERT's tokenizer, rebuilt offline from the OLMo byte-level BPE it extends (DESIGN §4).

Ids 0..50279 are the OLMo BPE's; ModernBERT adds ``[UNK] [CLS] [SEP] [PAD] [MASK]`` at
50280..50284 (``[MASK]`` absorbs the space before it) and ``[unused0..82]`` up to 50367, with a
``[CLS] $A [SEP]`` post-processor. The result reproduces ModernBERT-base's ids exactly.
"""

from __future__ import annotations

from pathlib import Path

SPECIALS = ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")
UNUSED = 83
MAX_LENGTH = 8192


def build_modernbert_tokenizer(olmo_tokenizer_json: str, out: Path) -> None:
    """Write a folder ``AutoTokenizer.from_pretrained`` loads as ModernBERT-base's tokenizer."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(olmo_tokenizer_json)
    base = backend.get_vocab_size(with_added_tokens=True)
    backend.add_special_tokens(
        [AddedToken(t, lstrip=t == "[MASK]", normalized=False, special=True) for t in SPECIALS]
        + [AddedToken(f"[unused{i}]", normalized=False, special=True) for i in range(UNUSED)]
    )
    ids = {token: backend.token_to_id(token) for token in SPECIALS}
    if ids["[UNK]"] != base or base != 50280:
        raise ValueError(f"unexpected OLMo vocabulary ({base} ids): not the BPE ModernBERT extends")
    backend.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token=AddedToken("[MASK]", lstrip=True, normalized=False, special=True),
        model_max_length=MAX_LENGTH,
        clean_up_tokenization_spaces=True,
    )
    tokenizer.save_pretrained(str(out))
