"""The metrics dataflow: decode → join → windows → sinks (docs/counting.md).

Pure logic lives in plain modules with no Bytewax in them, so it is tested
directly: :mod:`dataflows.clock`, :mod:`dataflows.join`, :mod:`dataflows.windows`,
:mod:`dataflows.pricing`. :mod:`dataflows.metrics` wires them into Bytewax.
"""
