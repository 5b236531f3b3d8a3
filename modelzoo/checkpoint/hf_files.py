"""The small JSON/tokenizer files of an HF model dir, written so that older tools read them too.

transformers 5 writes names that transformers 4.x (still pinned by llama.cpp's converter and many
serving stacks) does not know: ``tokenizer_class: TokenizersBackend`` (4.x: unknown class) and
``rope_parameters`` / ``dtype`` in ``config.json`` (4.x: silently rope_theta=10000, no llama3
scaling). Every writer of an HF dir (training checkpoints, conversion, data prep's ``tokenizer/``)
goes through these helpers. No torch here: data-prep processes import this.
"""

from __future__ import annotations

import json
from pathlib import Path

#: The files a tokenizer's ``save_pretrained`` may write (what is taken from a tokenizer dir; never weights).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")
#: transformers 5's generic fast-tokenizer class -> the alias that 4.x and 5.x both load.
PORTABLE_TOKENIZER_CLASS = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def portable_tokenizer_config(text: str) -> str:
    """``tokenizer_config.json`` text with a class name that transformers 4.x and 5.x both load."""
    data = json.loads(text)
    name = data.get("tokenizer_class")
    if name not in PORTABLE_TOKENIZER_CLASS:
        return text
    data["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS[name]
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def make_tokenizer_portable(directory: Path) -> None:
    """Rewrite ``directory/tokenizer_config.json`` with :func:`portable_tokenizer_config` (if needed)."""
    file = Path(directory) / "tokenizer_config.json"
    if file.is_file():
        text = file.read_text(encoding="utf-8")
        portable = portable_tokenizer_config(text)
        if portable != text:
            file.write_text(portable, encoding="utf-8")


def read_tokenizer_files(tokenizer_dir: str | Path | None) -> dict[str, bytes]:
    """The tokenizer files of ``tokenizer_dir`` (only :data:`TOKENIZER_FILES`), made portable, in
    memory: a run can write them into every checkpoint even after their source is gone."""
    if tokenizer_dir is None:
        return {}
    files = {}
    for name in TOKENIZER_FILES:
        path = Path(tokenizer_dir) / name
        if path.is_file():
            data = path.read_bytes()
            if name == "tokenizer_config.json":
                data = portable_tokenizer_config(data.decode("utf-8")).encode("utf-8")
            files[name] = data
    return files


def add_v4_config_fields(config_file: Path) -> None:
    """Add the transformers 4.x names of what 5.x writes as ``rope_parameters`` and ``dtype``:
    ``rope_theta``, ``rope_scaling`` (null for plain rope) and ``torch_dtype``; and
    ``architectures`` when missing. 5.x reads the file the same either way."""
    data = json.loads(config_file.read_text())
    rope = dict(data.get("rope_parameters") or {})
    if "rope_theta" in rope:
        data.setdefault("rope_theta", rope.pop("rope_theta"))
        data.setdefault("rope_scaling", None if rope.get("rope_type", "default") == "default" else rope)
    if "dtype" in data:
        data.setdefault("torch_dtype", data["dtype"])
    if data.get("model_type") == "llama" and not data.get("architectures"):
        data["architectures"] = ["LlamaForCausalLM"]
    config_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
