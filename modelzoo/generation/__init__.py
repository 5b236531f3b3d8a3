"""Text generation: static KV cache, prefill + single-token decode, sampling, batching, streaming,
telemetry, int8 weight-only models, tensor parallelism.

    from modelzoo.generation import Generator, SamplingParams, load_for_generation
    model = load_for_generation("/path/to/hf_dir", quantize="int8")
    generator = Generator(model, tokenizer, backend="inductor", batch_size=4)
    completions = generator.generate(prompts, max_new_tokens=64, sampling=SamplingParams(temperature=0.7))

Greedy decoding equals ``transformers`` ``generate`` token for token (``tests/test_generation*.py``).
The command line is ``modelzoo-generate`` (:mod:`modelzoo.cli.generate`).
"""

from .decoder import LlamaDecoder, StaticKVCache
from .engine import Completion, GenerationError, Generator, eos_ids
from .kernels import Int8Embedding
from .loading import load_for_generation, load_prequantized, model_nbytes, quantize_for_generation_
from .sampling import SamplingParams, choose_next, top_k_filter, top_p_filter
from .scheduler import (
    EngineRequest,
    EngineThread,
    QueueFull,
    RequestHandle,
    RequestResult,
    SlotEngine,
    TokenEvent,
)
from .stopping import SequenceState, StopChecker
from .telemetry import BatchTimes, Telemetry
from .tokenizer import ByteTokenizer, check_vocab, load_tokenizer

__all__ = [
    "BatchTimes",
    "ByteTokenizer",
    "Completion",
    "EngineRequest",
    "EngineThread",
    "GenerationError",
    "Generator",
    "Int8Embedding",
    "LlamaDecoder",
    "QueueFull",
    "RequestHandle",
    "RequestResult",
    "SamplingParams",
    "SequenceState",
    "SlotEngine",
    "StaticKVCache",
    "StopChecker",
    "Telemetry",
    "TokenEvent",
    "check_vocab",
    "choose_next",
    "eos_ids",
    "load_for_generation",
    "load_prequantized",
    "load_tokenizer",
    "model_nbytes",
    "quantize_for_generation_",
    "top_k_filter",
    "top_p_filter",
]
