"""dsjax.data: tokenizers, the arithmetic task and its split, corpora, packing, and exact resume."""

import ast
import collections
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from dsjax.config import ConfigError, DataConfig
from dsjax.data import (BATCH_KEYS, ByteTokenizer, arithmetic, documents, encode_document, heldout_problems,
                        make_eval_iterator, make_tokenizer, make_train_iterator, sources, train_problem)
from dsjax.data.packing import ChunkDocument
from dsjax.rl import rewards

BYTE = ByteTokenizer()
COMPLETION = re.compile(r"<think>(.*)</think> <answer>(-?\d+)</answer>")
PROMPT = re.compile(r"What is ([0-9 +*-]+)\?\n")
STEP = re.compile(r"(-?\d+) ([-+*]) (\d+) = (-?\d+)\.")


def batches(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert set(x) == set(y) == set(BATCH_KEYS)
        for key in BATCH_KEYS:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def segments(batch):
    """Each packed segment as its full token sequence: its tokens plus its last target."""
    out = []
    for tokens, targets, seg in zip(batch["tokens"], batch["targets"], batch["segment_ids"]):
        for s in np.unique(seg[seg > 0]):
            (idx,) = np.nonzero(seg == s)
            out.append(tuple(tokens[idx]) + (int(targets[idx[-1]]),))
    return out


def write_jsonl(path, texts, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({field: text, "id": 0}) + "\n")
    return str(path)


@pytest.fixture
def corpus(tmp_path):
    """A JSONL corpus of 60 distinct documents of 1..300 bytes (some longer than seq_len + 1)."""
    rng = np.random.default_rng(0)
    texts = [f"doc {i}: " + "".join(rng.choice(list("abcdefgh é"), size=int(rng.integers(1, 300))))
             for i in range(60)]
    return texts, write_jsonl(tmp_path / "corpus.jsonl", texts)


# ------------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip():
    text = "héllo wörld — 数学 🚀 \x00\n"
    ids = BYTE.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert BYTE.decode(ids) == text
    assert BYTE.decode([BYTE.bos_id] + ids + [BYTE.eos_id, BYTE.pad_id]) == text
    assert BYTE.decode([0xF0, 0x9F]) == "\ufffd"  # a cut multi-byte character decodes, replaced
    assert (BYTE.vocab_size, BYTE.pad_id, BYTE.bos_id, BYTE.eos_id) == (259, 256, 257, 258)
    doc = encode_document(BYTE, "ab")
    assert doc.dtype == np.int32 and doc.tolist() == [257, 97, 98, 258]


def _save_bpe(path, specials=("<s>", "</s>", "<pad>")):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["What is 37 + 48?", "the quick brown fox", "数学 is math"] * 10, trainer)
    tok.save(str(path))
    return str(path)


def test_hf_tokenizer(tmp_path):
    path = _save_bpe(tmp_path / "tokenizer.json")
    tok = make_tokenizer(path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    text = "What is 37 + 48? 数学 🚀"
    ids = tok.encode(text)
    assert tok.bos_id not in ids and tok.decode([tok.bos_id] + ids + [tok.eos_id]) == text
    assert max(ids) < tok.vocab_size
    assert make_tokenizer(str(tmp_path)).vocab_size == tok.vocab_size  # a folder holding tokenizer.json

    with open(tmp_path / "tokenizer_config.json", "w") as f:  # an HF folder names its specials
        json.dump({"bos_token": {"content": "</s>"}, "eos_token": "<s>"}, f)
    swapped = make_tokenizer(path)
    assert (swapped.bos_id, swapped.eos_id) == (1, 0)

    it = make_train_iterator(DataConfig(tokenizer=path), tok, batch_size=2, seq_len=32, process_index=0,
                             process_count=1)
    batch = next(it)
    assert batch["tokens"].max() < tok.vocab_size and tok.decode(segments(batch)[0]).startswith("What is")


def test_hf_tokenizer_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        make_tokenizer(str(tmp_path / "missing.json"))
    bad = tmp_path / "corrupt.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt.json"):
        make_tokenizer(str(bad))
    no_eos = _save_bpe(tmp_path / "noeos.json", specials=("<pad>",))
    with pytest.raises(ValueError, match="noeos.json.*end-of-sequence"):
        make_tokenizer(no_eos)


# ------------------------------------------------------------------------------ arithmetic


def _evaluate(expression: str) -> int:
    assert re.fullmatch(r"\d+( [-+*] \d+)+", expression), expression
    return eval(expression, {"__builtins__": {}})  # digits and + - * only: checked above


@pytest.mark.parametrize("config", [DataConfig(), DataConfig(arithmetic_ops=("+", "-", "*"), max_terms=4),
                                    DataConfig(max_operand=9, max_terms=2, seed=7)])
def test_arithmetic_completions_are_correct_and_well_formed(config):
    for p in [train_problem(config, i) for i in range(300)] + heldout_problems(config, 100):
        expression = PROMPT.fullmatch(p.prompt).group(1)
        terms = re.findall(r"\d+", expression)
        assert 2 <= len(terms) <= config.max_terms and all(int(t) <= config.max_operand for t in terms)
        assert set(re.findall(r"[-+*]", expression)) <= set(config.arithmetic_ops)
        think, answer = COMPLETION.fullmatch(p.completion).groups()
        assert answer == p.answer == str(_evaluate(expression))
        steps = STEP.findall(think)
        assert " ".join(f"{a} {op} {b} = {c}." for a, op, b, c in steps) == think
        assert len(steps) == len(terms) - 1 and steps[-1][3] == answer
        for a, op, b, c in steps:
            assert int(c) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert rewards.format_reward(p.completion) == 1.0
        assert rewards.accuracy_reward(p.completion, p.answer) == 1.0


def test_arithmetic_is_deterministic_and_pinned():
    config = DataConfig()
    first = train_problem(config, 0)
    # Pinned: blake2b draws must give the same problems on every machine and version.
    assert first.prompt == "What is 74 + 35 - 60?\n"
    assert first.completion == "<think>74 + 35 = 109. 109 - 60 = 49.</think> <answer>49</answer>"
    assert [train_problem(config, i) for i in range(50)] == [train_problem(config, i) for i in range(50)]
    other = [train_problem(DataConfig(seed=1), i).prompt for i in range(50)]
    assert other != [train_problem(config, i).prompt for i in range(50)]
    assert heldout_problems(config, 20) == heldout_problems(DataConfig(seed=1), 20)  # a fixed test set
    assert list(zip(range(5), arithmetic.train_problems(config, start=3))) == [
        (i, train_problem(config, 3 + i)) for i in range(5)]


@pytest.mark.parametrize("config", [DataConfig(), DataConfig(max_operand=9, max_terms=2)])
def test_heldout_is_disjoint_from_train(config):
    # With max_operand=9, max_terms=2 there are only 200 problem texts: only a split by content holds.
    heldout = {p.prompt for p in heldout_problems(config, 600)}
    train = {train_problem(config, i).prompt for i in range(20_000)}
    assert heldout and not heldout & train
    assert all(arithmetic.is_heldout(p) for p in heldout) and not any(arithmetic.is_heldout(p) for p in train)


def test_arithmetic_config_errors():
    with pytest.raises(ConfigError, match="data.max_terms"):
        train_problem(DataConfig(max_terms=1), 0)
    with pytest.raises(ConfigError, match="data.arithmetic_ops"):
        train_problem(DataConfig(arithmetic_ops=("/",)), 0)
    with pytest.raises(ConfigError, match="too small"):
        arithmetic.problem(0, 0, "heldout", max_operand=1, max_terms=2, ops=("+",))


# --------------------------------------------------------------------------------- corpora


def test_comma_separated_paths_from_the_command_line(tmp_path):
    """`--config.data.paths=a.txt,b.txt` (README): ml_collections hands over ("a.txt,b.txt",) (and
    "'/x/a.txt,/x/b.txt'" quoted the same way); the config splits it into two files. Parsed as
    scripts/train.py parses it, in a subprocess (the override flags exist only on absl's FLAGS)."""
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(f"text of {name}\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parse = ("import sys; from absl import flags; from ml_collections import config_flags; "
             "from dsjax.config import from_config_dict; c = config_flags.DEFINE_config_file('config'); "
             "flags.FLAGS(sys.argv); print(repr(from_config_dict(c.value).data.paths))")
    for value, want in (("a.txt,b.txt", ("a.txt", "b.txt")),
                        (f"'{tmp_path}/a.txt,{tmp_path}/b.txt'", (f"{tmp_path}/a.txt", f"{tmp_path}/b.txt"))):
        out = subprocess.run([sys.executable, "-c", parse, f"--config={root}/configs/tiny.py",
                              f"--config.data.paths={value}"], capture_output=True, text=True, check=True,
                             cwd=tmp_path, env=dict(os.environ, PYTHONPATH=root)).stdout
        assert ast.literal_eval(out.strip().splitlines()[-1]) == want
    config = DataConfig(source="text", paths=tuple(f"{tmp_path}/{n}" for n in ("a.txt", "b.txt")), heldout_size=0)
    assert sorted(documents(config, "train")) == ["text of a.txt\n", "text of b.txt\n"]


def test_stdlib_corpus():
    files = sources.stdlib_files()
    assert len(files) > 100 and list(files) == sorted(files) and "os.py" in files
    assert not any(part in sources.STDLIB_EXCLUDED_DIRS for f in files for part in f.split(os.sep))
    config = DataConfig(source="stdlib", heldout_size=20)
    train, heldout = documents(config, "train"), documents(config, "heldout")
    assert len(heldout) == 20 and len(train) + len(heldout) == len(files)
    held = [heldout[i] for i in range(20)]
    assert held == [documents(DataConfig(source="stdlib", heldout_size=20, seed=5), "heldout")[i]
                    for i in range(20)]
    every_file = collections.Counter(
        open(os.path.join(sources.stdlib_root(), f), encoding="utf-8", errors="replace").read() for f in files)
    assert collections.Counter(train) + collections.Counter(held) == every_file  # a partition of the files
    assert all(isinstance(d, str) and d for d in held)
    with pytest.raises(ConfigError, match="data.heldout_size"):
        documents(DataConfig(source="stdlib", heldout_size=len(files)), "train")


def test_jsonl_and_text_sources(tmp_path, corpus):
    texts, path = corpus
    config = DataConfig(source="jsonl", paths=(path,), heldout_size=10)
    train, heldout = documents(config, "train"), documents(config, "heldout")
    assert sorted(list(train) + list(heldout)) == sorted(texts)
    other = write_jsonl(tmp_path / "other.jsonl", ["x", "y"], field="body")
    both = DataConfig(source="jsonl", paths=(str(tmp_path / "*.jsonl"),), jsonl_field="body", heldout_size=0)
    with pytest.raises(ValueError, match=r"corpus.jsonl:1: no field 'body'"):
        documents(both, "train")
    assert sorted(documents(DataConfig(source="jsonl", paths=(other,), jsonl_field="body", heldout_size=0),
                            "train")) == ["x", "y"]
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(f"text of {name} — é\n", encoding="utf-8")
    text_docs = documents(DataConfig(source="text", paths=(str(tmp_path / "*.txt"),), heldout_size=0), "train")
    assert sorted(text_docs) == ["text of a.txt — é\n", "text of b.txt — é\n"]
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: not valid UTF-8 at byte 3"):
        documents(DataConfig(source="text", paths=(str(tmp_path / "latin1.txt"),), heldout_size=0), "train")[0]


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"', r"bad.jsonl:3: not valid JSON"),
    ('{"body": "no text field"}', r"bad.jsonl:3: no field 'text'"),
    ('{"text": 42}', r"bad.jsonl:3: field 'text' is a int, expected a string"),
    ('["a list"]', r"bad.jsonl:3: expected a JSON object"),
])
def test_jsonl_bad_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "one"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        documents(DataConfig(source="jsonl", paths=(str(path),)), "train")


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        documents(DataConfig(source="jsonl", paths=(str(tmp_path / "nope.jsonl"),)), "train")
    with pytest.raises(FileNotFoundError, match=r"no file matches .*\*.txt"):
        documents(DataConfig(source="text", paths=(str(tmp_path / "*.txt"),)), "train")
    with pytest.raises(ConfigError, match="data.paths"):
        documents(DataConfig(source="text"), "train")


def test_arrayrecord_source(tmp_path):
    module = pytest.importorskip("array_record.python.array_record_module")
    texts = [f"record {i} — é" for i in range(12)]
    path = str(tmp_path / "docs.array_record")
    writer = module.ArrayRecordWriter(path, "group_size:1")
    for text in texts:
        writer.write(text.encode("utf-8"))
    writer.close()
    config = DataConfig(source="arrayrecord", paths=(path,), heldout_size=2)
    train, heldout = documents(config, "train"), documents(config, "heldout")
    assert len(heldout) == 2 and sorted(list(train) + list(heldout)) == sorted(texts)
    it = make_eval_iterator(config, BYTE, batch_size=2, seq_len=64, process_index=0, process_count=1)
    assert sorted(BYTE.decode(s) for b in it for s in segments(b)) == sorted(heldout)


# -------------------------------------------------------------------------- packing, batches


def test_chunks_cover_every_pair_once():
    ids = np.arange(100, 100 + 23, dtype=np.int32)
    chunks = ChunkDocument(seq_len=5).flat_map(ids)
    assert all(1 <= len(c["tokens"]) == len(c["targets"]) <= 5 for c in chunks)
    np.testing.assert_array_equal(np.concatenate([c["tokens"] for c in chunks]), ids[:-1])
    np.testing.assert_array_equal(np.concatenate([c["targets"] for c in chunks]), ids[1:])
    assert ChunkDocument(seq_len=5).flat_map(np.array([7], np.int32)) == []


def check_packing_invariants(batch, seq_len, pad_id):
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        k: ((batch["tokens"].shape[0], seq_len), np.float32 if k == "loss_mask" else np.int32)
        for k in BATCH_KEYS}
    for tokens, targets, mask, seg, pos in zip(*(batch[k] for k in BATCH_KEYS)):
        real = seg > 0
        np.testing.assert_array_equal(mask, real.astype(np.float32))  # padding carries no loss
        assert np.all(tokens[~real] == pad_id) and np.all(targets[~real] == pad_id) and np.all(pos[~real] == 0)
        n = int(real.sum())
        assert real[:n].all() and not real[n:].any()  # segments first, then padding
        if n == 0:
            continue
        ids = seg[:n]
        assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(ids) <= 1)  # 1, 1, 2, 2, 2, 3, …
        starts = np.r_[True, np.diff(ids) == 1]
        segment_start = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
        np.testing.assert_array_equal(pos[:n], np.arange(n) - segment_start)  # restart at 0 per document
        same_doc = seg[1:n] == seg[:n - 1]  # inside a document a target is the next token
        np.testing.assert_array_equal(targets[:n - 1][same_doc], tokens[1:n][same_doc])


def test_packing_invariants_and_content(corpus):
    texts, path = corpus
    seq_len = 64
    config = DataConfig(source="jsonl", paths=(path,), heldout_size=0)
    it = make_train_iterator(config, BYTE, batch_size=4, seq_len=seq_len, process_index=0, process_count=1,
                             num_epochs=1)
    seen = list(it)
    for batch in seen:
        check_packing_invariants(batch, seq_len, BYTE.pad_id)
    # Every document comes back whole: its chunks (each seq_len + 1 tokens sharing one) rejoin it.
    docs = sorted(tuple(encode_document(BYTE, t)) for t in texts)
    pieces = [s for b in seen for s in segments(b)]
    whole = sorted(p for p in pieces if p[0] == BYTE.bos_id and p[-1] == BYTE.eos_id)
    assert whole == [d for d in docs if len(d) <= seq_len + 1]
    assert sum(len(p) - 1 for p in pieces) == sum(len(d) - 1 for d in docs)  # every pair once


def test_arithmetic_batches():
    config = DataConfig(heldout_size=16)
    it = make_train_iterator(config, BYTE, batch_size=4, seq_len=256, process_index=0, process_count=1)
    batch = next(it)
    check_packing_invariants(batch, 256, BYTE.pad_id)
    texts = [BYTE.decode(s) for s in segments(batch)]
    assert texts[0] == train_problem(config, 0).text  # first-fit packing keeps the stream order per row
    assert set(texts) <= {train_problem(config, i).text for i in range(100)}
    assert batch["segment_ids"].max() >= 2  # several problems share a row
    eval_texts = [BYTE.decode(s) for b in make_eval_iterator(config, BYTE, batch_size=4, seq_len=256,
                                                              process_index=0, process_count=1)
                  for s in segments(b)]
    assert sorted(eval_texts) == sorted(p.text for p in heldout_problems(config))


# ------------------------------------------------------------------------ resume, sharding


@pytest.mark.parametrize("source", ["arithmetic", "stdlib", "jsonl"])
def test_resume_is_exact(source, corpus):
    config = DataConfig(source=source, paths=(corpus[1],) if source == "jsonl" else (), heldout_size=8, seed=3)
    kwargs = dict(batch_size=16, seq_len=64, process_index=1, process_count=2)
    reference = batches(make_train_iterator(config, BYTE, **kwargs), 12)
    if source == "jsonl":  # 26 documents in this shard: the 12 batches span more than an epoch
        assert sum(s[0] == BYTE.bos_id for b in reference for s in segments(b)) > 26
    for k in (1, 5, 9):
        it = make_train_iterator(config, BYTE, **kwargs)
        assert_batches_equal(batches(it, k), reference[:k])  # deterministic
        state = json.loads(json.dumps(it.get_state()))  # as stored in a checkpoint
        resumed = make_train_iterator(config, BYTE, **kwargs)
        resumed.set_state(state)
        assert_batches_equal(batches(resumed, 12 - k), reference[k:])
    other = make_train_iterator(DataConfig(source=source, paths=config.paths, heldout_size=8, seed=4), BYTE,
                                **kwargs)
    with pytest.raises(ValueError, match="seed"):
        other.set_state(state)


def test_epochs_reshuffle(corpus):
    texts, path = corpus
    config = DataConfig(source="jsonl", paths=(path,), heldout_size=0)
    it = make_train_iterator(config, BYTE, batch_size=2, seq_len=512, process_index=0, process_count=1,
                             num_epochs=2)
    order = [BYTE.decode(s[1:-1]) for b in it for s in segments(b)]
    assert collections.Counter(order) == collections.Counter(texts * 2)
    # Rows may mix the end of one epoch with the start of the next (packing bins), so compare the
    # order of first and second sightings.
    first = {text: i for i, text in reversed(list(enumerate(order)))}
    second = {text: i for i, text in enumerate(order)}
    assert sorted(texts, key=first.get) != sorted(texts, key=second.get)


def test_two_processes_read_disjoint_shards(corpus):
    texts, path = corpus
    config = DataConfig(source="jsonl", paths=(path,), heldout_size=0)
    shards = []
    for process_index in (0, 1):
        it = make_train_iterator(config, BYTE, batch_size=4, seq_len=512, process_index=process_index,
                                 process_count=2, num_epochs=1)
        seen = list(it)
        assert all(b["tokens"].shape == (2, 512) for b in seen)
        shards.append({BYTE.decode(s[1:-1]) for b in seen for s in segments(b)})
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(texts)
    with pytest.raises(ConfigError, match="train.batch_size"):
        make_train_iterator(config, BYTE, batch_size=3, seq_len=64, process_index=0, process_count=2)


def test_eval_iterator_pads_to_num_batches():
    config = DataConfig(heldout_size=6)
    kwargs = dict(batch_size=4, seq_len=128, process_count=2)
    runs = [list(make_eval_iterator(config, BYTE, process_index=i, num_batches=3, **kwargs)) for i in (0, 1)]
    assert [len(r) for r in runs] == [3, 3]
    texts = sorted(BYTE.decode(s) for r in runs for b in r for s in segments(b))
    assert texts == sorted(p.text for p in heldout_problems(config))
    last = runs[0][-1]
    assert last["tokens"].shape == (2, 128) and last["loss_mask"].sum() == 0


def test_worker_processes_resume_exactly():
    config = DataConfig(num_workers=2, heldout_size=8)
    kwargs = dict(batch_size=4, seq_len=128, process_index=0, process_count=1)
    it = make_train_iterator(config, BYTE, **kwargs)
    head = batches(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    tail = batches(it, 3)
    it.close()
    resumed = make_train_iterator(config, BYTE, **kwargs)
    resumed.set_state(state)
    assert_batches_equal(batches(resumed, 3), tail)
    resumed.close()
    assert {BYTE.decode(s) for b in head for s in segments(b)} <= {train_problem(config, i).text for i in range(200)}
