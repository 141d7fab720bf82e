"""calm-prepare --runner beam: the same shards as prepare.py, written by an Apache Beam pipeline.

Each input unit (prepare_inputs.py: a file, or a random-access source) is one element; a
Beam worker writes that unit's parts with prepare.work, so the shards, done-markers and
prepare.json are exactly those of the local runner (and a rerun skips done parts). The
pipeline runs wherever Beam runs it (--runner_flags='--runner=DataflowRunner --project=...',
FlinkRunner, SparkRunner; the DirectRunner by default); the output directory and the inputs
must be paths every Beam worker can open (a shared filesystem or a FUSE mount). Needs
`pip install -e '.[beam]'`.
"""
import os
import time

from calm_jax.data import prepare
from calm_jax.data import records


def _import_beam():
  try:
    import apache_beam as beam  # pylint: disable=g-import-not-at-top
    from apache_beam.options import pipeline_options  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise records.DataError(
        "calm-prepare --runner beam needs Apache Beam: pip install -e '.[beam]'.") from e
  return beam, pipeline_options


class _WriteUnit:
  """A Beam DoFn body: unit index -> prepare.work on that unit only -> its counts."""

  def __init__(self, plan, max_bad_fraction):
    self._plan = plan
    self._max_bad_fraction = max_bad_fraction

  def __call__(self, unit):
    n_units = len(self._plan["unit_args"])
    yield prepare.work(self._plan, [(n_units, unit)], self._max_bad_fraction)


def prepare_with_beam(spec, tokenizer_path, output_dir, *, pipeline_flags=(),
                      max_bad_fraction=0.0, part_bytes=prepare.PART_BYTES,
                      part_docs=prepare.PART_DOCS):
  """Runs the Beam pipeline; returns the same summary dict as prepare.prepare."""
  beam, pipeline_options = _import_beam()
  plan, units = prepare.make_plan(spec, tokenizer_path, output_dir, part_bytes, part_docs)
  plan = dict(plan, output=os.path.abspath(output_dir),
              unit_args=[[u.scheme, u.path, u.field] for u in units])
  options = pipeline_options.PipelineOptions(list(pipeline_flags))
  start = time.time()
  counts_path = os.path.join(output_dir, "beam_counts")
  with beam.Pipeline(options=options) as p:
    _ = (p
         | "Units" >> beam.Create(list(range(len(units))))
         | "Reshuffle" >> beam.Reshuffle()
         | "WriteParts" >> beam.FlatMap(_WriteUnit(plan, max_bad_fraction))
         | "Sum" >> beam.CombineGlobally(_sum_counts)
         | "Save" >> beam.Map(lambda c: prepare.write_json(counts_path, c)))
  run = prepare.read_json(counts_path)
  os.remove(counts_path)
  return prepare.finish(spec, plan, output_dir, run, time.time() - start, 1, max_bad_fraction)


def _sum_counts(counts):
  total = dict(parts=0, documents=0, tokens=0)
  for c in counts:
    for k in total:
      total[k] += c[k]
  return total
