"""Train the bundled tiny tokenizer ``data/sample/tokenizer/`` on the sample corpus.

    python data/sample/make_tokenizer.py         # rewrites data/sample/tokenizer/ (deterministic)

A byte-level BPE with 384 ids (fits the tiny model's 1024-entry vocab): ``<pad>`` 0, ``<s>`` (BOS) 1,
``</s>`` (EOS) 2, the 256 byte symbols, then merges learned from the sample's prompts and
completions. Like Llama, it puts BOS before a text and appends no EOS; it has a small chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from modelzoo.data_prep.tokenizer_io import train_byte_level_bpe

HERE = Path(__file__).parent
VOCAB_SIZE = 384
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def texts(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            article = json.loads(line)
            for p in article if isinstance(article, list) else [article]:
                yield p["prompt"]
                yield " " + p["completion"]


def main(corpus: Path = HERE / "sample.jsonl", out: Path = HERE / "tokenizer") -> None:
    tok = train_byte_level_bpe(texts(corpus), VOCAB_SIZE, ["<pad>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(str(out))
    print(f"wrote a {len(hf)}-token tokenizer to {out}")


if __name__ == "__main__":
    main()
