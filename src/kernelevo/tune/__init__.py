"""Tuning: workloads, verification, timing, the measurement database, distillation."""

# The default search budget: configurations tried per shape besides the shipped one. With
# it the default workload tunes in under 5 minutes on a 2-core CPU.
DEFAULT_CANDIDATES = 12
