"""The grain input pipeline: documents -> token blocks -> per-process numpy batches.

  source --(train: shuffle per epoch, repeat forever)--> this process's slice
  (documents i with i % process_count == process_index) --> tokenize + EOS
  --> pack into blocks of seq_len [--> weighted mix of the components' blocks]
  --> batch --> prefetch

Random-access sources are shuffled globally (grain MapDataset); streaming sources (.gz/.zst
line files, Parquet: streams.StreamDataset) shuffle their file order per epoch. A weighted
mixture (SPEC@w,...) packs every component on its own and mixes the packed rows with
grain's IterDataset.mix, whose state holds every component's state.

Packing (both keep every token exactly once, in order):
  'concat'         documents, each followed by EOS, are concatenated and cut into
                   blocks of seq_len; a document may span blocks.
  'chunk_aligned'  each document + EOS is padded with PAD to a multiple of K
                   (chunk_size) before concatenating, so no K-token chunk crosses
                   a document; pad positions have mask 0.
The EOS after each document is config.data.document_eos (the reference's CALM and AR
scripts leave it out: their Llama-3 tokenizer's BOS is the only boundary), and
config.data.pad_in_loss gives the chunk padding mask 1 (the reference autoencoder
reconstructs its padding too). PAD and EOS are the tokenizer's ids.
Training repeats the source forever, so no tail is ever dropped. An eval pass is
finite: its last block is padded with mask-0 positions and its last batch with
mask-0 rows. Packing is grain.experimental.ConcatThenSplitIterDataset, so the
iterator state (get_state/set_state, or orbax with grain.checkpoint.CheckpointSave /
CheckpointRestore) is small JSON and restores the exact next batch (for the same
process count).

Sharding is by document, so the processes' eval passes may differ in length by
a batch or so; a multi-process evaluator must agree on how many batches to run.
"""
import grain
import numpy as np

from calm_jax import errors
from calm_jax.data import sources
from calm_jax.data import streams
from calm_jax.data import tokenizer as tokenizer_lib

PACKINGS = ("concat", "chunk_aligned")
# Documents read ahead (and tokenized) by grain's reader threads.
_READ_THREADS = 2
_READ_BUFFER = 64


def _is_nonempty(document):
  return len(document) > 0


class _ToExample(grain.transforms.Map):
  """A document (text or token ids) -> {'tokens', 'mask'}: ids (+ EOS) (+ PAD to K's multiple)."""

  def __init__(self, tokenizer, chunk_size, document_eos=True, pad_in_loss=False):
    self._tokenizer = tokenizer
    # No tokenizer: token-id sources written with calm-tokenizer's SentencePiece ids.
    self._pad_id = tokenizer_lib.PAD_ID if tokenizer is None else tokenizer.pad_id
    self._eos_id = tokenizer_lib.EOS_ID if tokenizer is None else tokenizer.eos_id
    self._chunk_size = chunk_size
    self._document_eos = document_eos
    self._pad_in_loss = pad_in_loss

  def map(self, document):
    if isinstance(document, str):
      document = self._tokenizer.encode(document)
    n = len(document) + int(self._document_eos)
    length = -(-n // self._chunk_size) * self._chunk_size
    tokens_L = np.full(length, self._pad_id, np.int32)
    tokens_L[:len(document)] = document
    if self._document_eos:
      tokens_L[n - 1] = self._eos_id
    mask_L = np.zeros(length, np.int32)
    mask_L[:length if self._pad_in_loss else n] = 1
    return {"tokens": tokens_L, "mask": mask_L}


class _DropPackingInfo(grain.transforms.Map):
  """Keeps only tokens and mask of a packed block (positions beyond the data are 0 = PAD)."""

  def map(self, block):
    return {"tokens": block["tokens"], "mask": block["mask"]}


class _PadRows(grain.transforms.Map):
  """Pads the short last batch of an eval pass with all-PAD, mask-0 rows."""

  def __init__(self, batch_size):
    self._batch_size = batch_size

  def map(self, batch):
    missing = self._batch_size - batch["tokens"].shape[0]
    if missing <= 0:
      return batch
    return {k: np.pad(v, ((0, missing), (0, 0))) for k, v in batch.items()}


class _JsonSafePacking(grain.IterDataset):
  """ConcatThenSplitIterDataset whose state survives JSON (as orbax stores it): grain 0.2.18
  compares the restored remainder slices with the tuple (-1, -1), so a JSON list [-1, -1]
  (no remainder) reads as a remainder and the restored iterator skips a document."""

  def __iter__(self):
    return _JsonSafePackingIterator(self._parent.__iter__())


class _JsonSafePackingIterator(grain.DatasetIterator):
  """Passes everything through; set_state turns the remainder slices back into tuples."""

  def __next__(self):
    return next(self._parent)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    slices = {k: tuple(v) for k, v in state["remainder_slices"].items()}
    self._parent.set_state(dict(state, remainder_slices=slices))


def _streams(source):
  parts = source.sources if isinstance(source, sources.WeightedMixture) else (source,)
  return any(sources.is_stream(s) for s in parts)


def _packed(source, example, seq_len, name, *, shuffle, seed, repeat, process_index, process_count):
  """One source -> an IterDataset of this process's packed rows {'tokens', 'mask'}: int32[seq_len]."""
  if sources.is_stream(source):
    ds = streams.StreamDataset(source, shuffle=shuffle, seed=seed, repeat=repeat,
                               process_index=process_index, process_count=process_count)
    ds = ds.filter(_is_nonempty).map(example)
  else:
    if len(source) == 0:
      raise sources.DataError(f"The data SPEC {name!r} has no documents (its files are empty, "
                              "or every record is empty or was skipped); point it at data with "
                              "text.")
    ds = grain.MapDataset.source(source)
    if shuffle:
      ds = ds.shuffle(seed=seed)
    if repeat:
      ds = ds.repeat()  # reseeds the shuffle every epoch
    ds = ds[process_index::process_count]
    ds = ds.filter(_is_nonempty)
    ds = ds.map(example)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=_READ_THREADS,
                                              prefetch_buffer_size=_READ_BUFFER))
  ds = grain.experimental.ConcatThenSplitIterDataset(
      ds, length_struct={"tokens": seq_len, "mask": seq_len})
  return _JsonSafePacking(ds).map(_DropPackingInfo())


def make_dataset(spec, tokenizer, *, seq_len, batch_size, packing="concat",
                 chunk_size=1, document_eos=True, pad_in_loss=False, shuffle=False, seed=0,
                 repeat=False,
                 process_index=0, process_count=1, max_bad_fraction=0.0,
                 worker_count=0, prefetch=0):
  """A grain IterDataset of per-process batches {'tokens', 'mask'}: int32[batch_size, seq_len].

  Args:
    spec: a data SPEC string (see sources.py) or an already parsed source.
    tokenizer: a loaded tokenizer (tokenizer.load); it encodes text and gives PAD and EOS.
      None for token-id sources only, which then use calm-tokenizer's SentencePiece ids.
    seq_len: tokens per row; a multiple of chunk_size.
    batch_size: rows per batch on this process.
    packing: 'concat' or 'chunk_aligned' (see the module docstring).
    chunk_size: K, the chunk length that 'chunk_aligned' keeps within a document.
    document_eos: append the tokenizer's EOS to every document.
    pad_in_loss: 'chunk_aligned' padding gets mask 1 (trained on) instead of 0.
    shuffle: shuffle documents with `seed` (a new order every epoch).
    seed: shuffle seed.
    repeat: repeat forever (training); else one pass with padded tail (eval).
    process_index, process_count: this process reads documents
      process_index, process_index + process_count, ... of the (shuffled) stream.
    max_bad_fraction: the fraction of bad lines (records.py) skipped before failing.
    worker_count: grain worker processes (0 = in this process).
    prefetch: batches prefetched by a background thread (when worker_count == 0).
  """
  if packing not in PACKINGS:
    raise ValueError(f"packing={packing!r}: use one of {PACKINGS}.")
  if seq_len % chunk_size:
    raise ValueError(f"seq_len={seq_len} is not a multiple of the chunk size K={chunk_size}.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
  source = (sources.parse_spec(spec, max_bad_fraction,
                               vocab_size=tokenizer.vocab_size if tokenizer else None)
            if isinstance(spec, str) else spec)
  order = dict(shuffle=shuffle, repeat=repeat, process_index=process_index,
               process_count=process_count)
  example = _ToExample(tokenizer, chunk_size if packing == "chunk_aligned" else 1,
                       document_eos, pad_in_loss)
  if isinstance(source, sources.WeightedMixture):
    ds = grain.IterDataset.mix(
        [_packed(s, example, seq_len, spec, seed=seed + i, **order)
         for i, s in enumerate(source.sources)], list(source.weights))
  else:
    ds = _packed(source, example, seq_len, spec, seed=seed, **order)
  if worker_count > 0 and _streams(source):
    raise sources.DataError(
        f"config.data.worker_count={worker_count}: streaming sources (.gz/.zst, parquet) are "
        "read in this process; set config.data.worker_count=0 (or calm-prepare them).")
  ds = ds.batch(batch_size, drop_remainder=False)
  if not repeat:
    ds = ds.map(_PadRows(batch_size))
  if worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  elif prefetch > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
  return ds


def make_iterator(config, tokenizer, split="train", process_index=None, process_count=None):
  """The checkpointable grain DatasetIterator of this process's batches for a run.

  split='train': config.data.train, shuffled with config.train.seed, repeats
  forever, rows of config.data.seq_len, config.train.batch_size // process_count
  rows. split='eval': config.data.eval, one pass in order, rows of
  config.eval.block_len, config.eval.batch_size // process_count rows.
  Process index/count default to jax.process_index()/jax.process_count().
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  if split == "train":
    spec, seq_len, global_batch = config.data.train, config.data.seq_len, config.train.batch_size
    field = "config.train.batch_size"
  elif split == "eval":
    spec, seq_len, global_batch = config.data.eval, config.eval.block_len, config.eval.batch_size
    field = "config.eval.batch_size"
  else:
    raise ValueError(f"split={split!r}: use 'train' or 'eval'.")
  if global_batch % process_count:
    raise ValueError(
        f"{field}={global_batch} is not divisible by the {process_count} processes; "
        f"use a multiple of {process_count}.")
  training = split == "train"
  ds = make_dataset(
      spec, tokenizer, seq_len=seq_len, batch_size=global_batch // process_count,
      packing=config.data.packing, chunk_size=config.model.patch_size,
      document_eos=config.data.document_eos, pad_in_loss=config.data.pad_in_loss,
      shuffle=training, seed=config.train.seed, repeat=training,
      process_index=process_index, process_count=process_count,
      max_bad_fraction=config.data.max_bad_fraction,
      worker_count=config.data.worker_count, prefetch=config.data.prefetch)
  return iter(ds)


def _unreadable(config, split, error):
  spec = config.data.train if split == "train" else config.data.eval
  return (f"config.data.{split}={spec!r} cannot be read ({type(error).__name__}: {error}); "
          "fix or replace the file, or point the SPEC elsewhere.")


def make_checked_iterator(config, tokenizer, split):
  """make_iterator, with unreadable data reported as a DataError naming the SPEC."""
  try:
    return make_iterator(config, tokenizer, split)
  except (OSError, RuntimeError) as e:
    raise sources.DataError(_unreadable(config, split, e)) from e


def next_batch(iterator, config):
  """The next training batch; on a data error the iterator is left where it was."""
  snapshot = iterator.get_state()
  try:
    return next(iterator)
  except errors.UserError:
    iterator.set_state(snapshot)
    raise
  except (OSError, RuntimeError) as e:
    iterator.set_state(snapshot)
    raise sources.DataError(_unreadable(config, "train", e)) from e
