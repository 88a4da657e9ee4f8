"""Data: tokenizers, the embedded arithmetic (R1-format) and stdlib corpora, user files, packing, grain.

    tokenizer = make_tokenizer(config.data.tokenizer)           # "byte" or a tokenizer.json
    it = make_train_iterator(config.data, tokenizer, batch_size=config.train.batch_size)
    batch = next(it)    # numpy: tokens, targets, segment_ids, positions int32 [b, T]; loss_mask float32
    state = it.get_state()                                      # JSON-ready; it.set_state(state) resumes

`b = batch_size // process_count`: each process reads its own shard. GRPO takes prompts from
`arithmetic.train_problem` / `arithmetic.heldout_problems`.
"""

from dsjax.data.arithmetic import (Problem, heldout_problem, heldout_problems, problem, train_problem,
                                   train_problems)
from dsjax.data.packing import BATCH_KEYS
from dsjax.data.pipeline import DataIterator, make_eval_iterator, make_train_iterator
from dsjax.data.sources import documents
from dsjax.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, encode_document, make_tokenizer

__all__ = [
    "BATCH_KEYS", "ByteTokenizer", "DataIterator", "HFTokenizer", "Problem", "Tokenizer", "documents",
    "encode_document", "heldout_problem", "heldout_problems", "make_eval_iterator", "make_tokenizer",
    "make_train_iterator", "problem", "train_problem", "train_problems",
]
