"""Tokenizing a corpus into ArrayRecord shards (calm-prepare, cli/prepare.py): parallel, resumable, splittable.

The SPEC's units and parts are described in prepare_inputs.py; part P of unit U becomes

  DIR/data-UUUUU-PPPPP.array_record        one record per document, in source order, encoded
                                           as sources.encode_tokens describes
  DIR/data-UUUUU-PPPPP.array_record.done   its done-marker (JSON counts), written after the
                                           shard is complete (it is written as .tmp, then renamed)
  DIR/data-UUUUU.parts                     the number of parts of unit U, once it was read to the end

so reading the shards in name order gives back the source order. A killed prepare resumes
where it stopped: parts with a done-marker are skipped, a half-written shard is written again.
DIR/prepare_plan.json records the SPEC, the tokenizer and the part sizes; a prepare into a
directory planned differently is refused. --num_shards N --shard_index I makes this
process do only the parts of shard I of N (one array job per shard); --num_workers W splits
this process's parts between W local processes. When every part of every unit is done,
DIR/prepare.json sums them up (documents, tokens, bad lines, tokens/s). Train on the result
with --config.data.train=arrayrecord:DIR. Progress: one bar over this process's parts
(prepare_progress.py).
"""
import concurrent.futures
import glob
import hashlib
import json
import multiprocessing
import os
import time

from array_record.python import array_record_module

from calm_jax.data import prepare_inputs
from calm_jax.data import prepare_progress
from calm_jax.data import records
from calm_jax.data import sources
from calm_jax.data import tokenizer as tokenizer_lib

PART_BYTES = 64 << 20     # uncompressed bytes of a line file per part (shard)
PART_DOCS = 50_000        # documents of a random-access source per part
_ENCODE_BATCH = 64        # documents per tokenizer batch call
PLAN_FILE = "prepare_plan.json"
SUMMARY_FILE = "prepare.json"


def shard_path(output_dir, unit, part):
  return os.path.join(output_dir, f"data-{unit:05d}-{part:05d}{sources.ARRAYRECORD_SUFFIX}")


def write_json(path, value):
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2)
  os.replace(tmp, path)


def read_json(path):
  with open(path) as f:
    return json.load(f)


def _digest(path):
  """A short digest of a tokenizer file (or of a directory's tokenizer files)."""
  paths = [path] if os.path.isfile(path) else sorted(
      os.path.join(path, n) for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))
  h = hashlib.sha256()
  for p in paths:
    with open(p, "rb") as f:
      h.update(f.read())
  return h.hexdigest()[:16]


def make_plan(spec, tokenizer_path, output_dir, part_bytes, part_docs):
  """Checks the SPEC and the output directory; writes or compares DIR/prepare_plan.json."""
  if part_bytes < 1 or part_docs < 1:
    raise records.DataError(f"part sizes must be positive (part bytes {part_bytes}, part "
                            f"documents {part_docs}); raise --part_mb / --part_docs.")
  units = prepare_inputs.units(spec)
  tok = tokenizer_lib.load(tokenizer_path)
  plan = dict(data=spec, units=[u.what for u in units],
              tokenizer=os.path.abspath(tokenizer_path), tokenizer_digest=_digest(tokenizer_path),
              vocab_size=tok.vocab_size, part_bytes=part_bytes, part_docs=part_docs)
  os.makedirs(output_dir, exist_ok=True)
  path = os.path.join(output_dir, PLAN_FILE)
  if os.path.exists(path):
    old = read_json(path)
    changed = [k for k in plan if k != "tokenizer" and old.get(k) != plan[k]]
    if changed:
      raise records.DataError(
          f"{output_dir} holds shards of another prepare ({changed[0]}: {old.get(changed[0])!r}, "
          f"now {plan[changed[0]]!r}); use another --output or delete {output_dir}.")
  elif glob.glob(os.path.join(output_dir, "*" + sources.ARRAYRECORD_SUFFIX)):
    raise records.DataError(
        f"{output_dir} already holds .array_record files but no {PLAN_FILE}; use another "
        f"--output or delete them (they would mix into arrayrecord:{output_dir}).")
  else:
    write_json(path, plan)
  return plan, units


def _write_part(output_dir, unit, part, texts_where, tok, bad, reporter):
  """Tokenizes one part into its shard (atomically), then writes its done-marker.

  reporter (prepare_progress.Reporter) gets the records, bytes, documents and tokens read.
  """
  final = shard_path(output_dir, unit, part)
  tmp = final + ".tmp"
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
  counts = dict(documents=0, tokens=0, lines=0, empty=0, bad=0, first=[], bytes=0)
  lines0, empty0, bad0 = bad.lines, bad.empty, bad.bad
  first0 = len(bad.first)
  batch = []
  read = dict(records=0, bytes=0)

  def flush():
    tokens = 0
    for ids in tok.encode_batch(batch):
      writer.write(sources.encode_tokens(ids))
      tokens += len(ids)
    counts["documents"] += len(batch)
    counts["tokens"] += tokens
    counts["bytes"] += read["bytes"]
    reporter.add(documents=len(batch), tokens=tokens, **read)
    batch.clear()
    read.update(records=0, bytes=0)

  try:
    for text, where, why, nbytes in texts_where:
      bad.count(text, where, why)
      bad.check()
      read["records"] += 1
      read["bytes"] += nbytes
      if text and text.strip():
        batch.append(text)
        if len(batch) == _ENCODE_BATCH:
          flush()
    flush()
  finally:
    writer.close()
  os.replace(tmp, final)
  counts.update(lines=bad.lines - lines0, empty=bad.empty - empty0, bad=bad.bad - bad0,
                first=bad.first[first0:])
  write_json(final + ".done", counts)
  reporter.add(parts=1)
  return counts


def work(plan, levels, max_bad_fraction, reporter=None):
  """Writes the parts owned by this worker (levels: [(n, index)], see prepare_inputs.owner).

  reporter: a prepare_progress.Reporter (None: a pool worker's queue, else nowhere).
  Returns {'parts', 'documents', 'tokens', 'seconds'} of the parts written here.
  """
  start = time.time()
  reporter = reporter or prepare_progress.queue_reporter()
  output_dir = plan["output"]
  tok = tokenizer_lib.load(plan["tokenizer"])
  units = [prepare_inputs.Unit(*u) for u in plan["unit_args"]]
  done = dict(parts=0, documents=0, tokens=0)
  for u, unit in enumerate(units):
    if not prepare_inputs.reads_unit(len(units), levels, u):
      continue
    bad = records.BadRecords(unit.what, max_bad_fraction)
    count = 0
    for part, texts_where in prepare_inputs.parts(unit, plan["part_bytes"], plan["part_docs"]):
      count = part + 1
      if not prepare_inputs.owner(len(units), levels, u, part):
        continue
      marker = shard_path(output_dir, u, part) + ".done"
      if os.path.exists(marker):  # done by an earlier run: its bad lines still count
        counts = read_json(marker)
        bad.add(counts["lines"], counts["empty"], counts["bad"], counts["first"])
        continue
      counts = _write_part(output_dir, u, part, texts_where, tok, bad, reporter)
      done["parts"] += 1
      done["documents"] += counts["documents"]
      done["tokens"] += counts["tokens"]
    bad.check(final=True)
    write_json(os.path.join(output_dir, f"data-{u:05d}.parts"), dict(parts=count))
  done["seconds"] = time.time() - start
  return done


def summarize(output_dir, n_units):
  """The sum of every part's done-marker, or None while a part is missing."""
  total = dict(documents=0, tokens=0, lines=0, empty=0, bad=0, shards=0, first=[])
  for u in range(n_units):
    parts_file = os.path.join(output_dir, f"data-{u:05d}.parts")
    if not os.path.exists(parts_file):
      return None
    for part in range(read_json(parts_file)["parts"]):
      marker = shard_path(output_dir, u, part) + ".done"
      if not os.path.exists(marker):
        return None
      counts = read_json(marker)
      for k in ("documents", "tokens", "lines", "empty", "bad"):
        total[k] += counts[k]
      total["first"] = (total["first"] + counts["first"])[:records.FIRST_BAD]
      total["shards"] += 1
  return total


def prepare(spec, tokenizer_path, output_dir, *, num_workers=1, num_shards=1, shard_index=None,
            max_bad_fraction=0.0, part_bytes=PART_BYTES, part_docs=PART_DOCS):
  """Tokenizes a text SPEC into ArrayRecord shards under output_dir (see the module docstring).

  shard_index=None: every shard here. Returns a summary dict: this run's parts, documents,
  tokens, seconds and tokens_per_s_per_worker, plus `complete` (all shards of every machine
  done) and, when complete, the totals of prepare.json.
  """
  if shard_index is not None and not 0 <= shard_index < num_shards:
    raise records.DataError(f"--shard_index={shard_index} is not in [0, {num_shards}).")
  plan, units = make_plan(spec, tokenizer_path, output_dir, part_bytes, part_docs)
  plan = dict(plan, output=output_dir,
              unit_args=[[u.scheme, u.path, u.field] for u in units])
  machines = [(num_shards, shard_index)] if shard_index is not None else []
  start = time.time()
  with prepare_progress.Display(*prepare_progress.extent(
      units, machines, output_dir, part_bytes, part_docs)) as display:
    if num_workers <= 1:
      results = [work(plan, machines, max_bad_fraction, prepare_progress.Reporter(display.add))]
    else:
      ctx = multiprocessing.get_context("spawn")
      queue = ctx.SimpleQueue()
      with concurrent.futures.ProcessPoolExecutor(
          num_workers, mp_context=ctx, initializer=prepare_progress.set_queue,
          initargs=(queue,)) as pool:
        futures = [pool.submit(work, plan, machines + [(num_workers, w)], max_bad_fraction)
                   for w in range(num_workers)]
        prepare_progress.wait(futures, queue, display)
        results = [f.result() for f in futures]
  run = {k: sum(r[k] for r in results) for k in ("parts", "documents", "tokens")}
  return finish(spec, plan, output_dir, run, time.time() - start, max(1, num_workers),
                max_bad_fraction)


def finish(spec, plan, output_dir, run, seconds, workers, max_bad_fraction):
  """This run's counts + rate; writes prepare.json when every part of every unit is done."""
  run = dict(run, seconds=round(seconds, 2), workers=workers,
             tokens_per_s_per_worker=round(run["tokens"] / max(seconds, 1e-9) / workers))
  total = summarize(output_dir, len(plan["unit_args"]))
  if total is not None:  # judged over every shard of every machine
    bad = records.BadRecords(spec, max_bad_fraction)
    bad.add(total["lines"], total["empty"], total["bad"], total["first"])
    bad.check(final=True)
    write_json(os.path.join(output_dir, SUMMARY_FILE),
               dict(total, data=spec, tokenizer=plan["tokenizer"], vocab_size=plan["vocab_size"]))
  return dict(run, complete=total is not None, total=total)
